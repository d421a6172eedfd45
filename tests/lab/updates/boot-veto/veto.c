// SPDX-License-Identifier: GPL-2.0
#include <linux/errno.h>
#include <linux/printk.h>
#include <linux/seq_file.h>

int loadavg_proc_show_vetoed(struct seq_file *m, void *v)
{
	seq_puts(m, "vetoed\n");
	return 0;
}

/* Refuses every load: livepatch then fails the module's init with this error. */
int boot_veto_refuse(void)
{
	pr_info("boot-veto: refusing to load, as the test asks\n");
	return -ENODEV;
}
