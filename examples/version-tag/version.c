// SPDX-License-Identifier: GPL-2.0
/* New edition of version_proc_show(): the same fields as the original, plus a tag. */
#include <linux/seq_file.h>
#include <linux/utsname.h>

int version_proc_show_tagged(struct seq_file *m, void *v)
{
	struct new_utsname *uts = utsname();

	seq_printf(m, "%s version %s %s [live-updated by dynamos]\n",
		   uts->sysname, uts->release, uts->version);
	return 0;
}
