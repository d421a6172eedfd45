// SPDX-License-Identifier: GPL-2.0-only
/* Per-task pipe byte counts in shadow data, shown in /proc/dynamos_pipe_bytes. */
#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/livepatch.h>
#include <linux/proc_fs.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/seq_file.h>
#include <linux/uio.h>

#include "dynamos_shadow.h"

#define PIPE_BYTES 1	/* shadow id: a u64 per task_struct; also the klp_state id in update.toml */

ssize_t dynamos_original__pipe_write(struct kiocb *iocb, struct iov_iter *from);
void dynamos_original__exit_fs(struct task_struct *tsk);

static atomic_long_t created, freed_at_exit;
static struct proc_dir_entry *entry;
static bool taking_over;	/* replacing an update that already keeps the counts */

ssize_t pipe_write_accounted(struct kiocb *iocb, struct iov_iter *from)
{
	ssize_t ret = dynamos_original__pipe_write(iocb, from);
	u64 *bytes;

	if (ret <= 0)
		return ret;
	bytes = dynamos_shadow_get_or_zalloc(current, PIPE_BYTES, sizeof(*bytes), GFP_KERNEL);
	if (bytes) {
		if (!*bytes)
			atomic_long_inc(&created);
		*bytes += ret;
	}
	return ret;
}

void exit_fs_forget(struct task_struct *tsk)
{
	if (dynamos_shadow_get(tsk, PIPE_BYTES)) {
		dynamos_shadow_free(tsk, PIPE_BYTES);
		atomic_long_inc(&freed_at_exit);
	}
	dynamos_original__exit_fs(tsk);
}

static int pipe_bytes_show(struct seq_file *m, void *v)
{
	struct task_struct *g, *t;
	u64 *bytes;

	seq_printf(m, "live %ld\ncreated %ld\nfreed_at_exit %ld\n", dynamos_shadow_live(PIPE_BYTES),
		   atomic_long_read(&created), atomic_long_read(&freed_at_exit));
	rcu_read_lock();
	for_each_process_thread(g, t) {
		bytes = dynamos_shadow_get(t, PIPE_BYTES);
		if (bytes)
			seq_printf(m, "task %d %s %llu\n", t->pid, t->comm, *bytes);
	}
	rcu_read_unlock();
	return 0;
}

/*
 * A cumulative update (replace = true) carrying the same state takes the counts over as they are:
 * the shadows stay, and the file of the update it replaces serves until the switch is complete.
 */
int pipe_bytes_start(void)
{
	taking_over = klp_get_prev_state(PIPE_BYTES) != NULL;
	if (taking_over)
		return 0;
	entry = proc_create_single("dynamos_pipe_bytes", 0444, NULL, pipe_bytes_show);
	return entry ? 0 : -ENOMEM;
}

/* Every task runs this update's code now: its file replaces the replaced update's. */
void pipe_bytes_takeover(void)
{
	if (!taking_over)
		return;
	remove_proc_entry("dynamos_pipe_bytes", NULL);	/* waits for its readers */
	entry = proc_create_single("dynamos_pipe_bytes", 0444, NULL, pipe_bytes_show);
	pr_info("dynamos pipe-bytes: took over %ld shadow(s) from the update it replaced%s\n",
		dynamos_shadow_live(PIPE_BYTES), entry ? "" : "; cannot create /proc/dynamos_pipe_bytes");
}

void pipe_bytes_stop(void)
{
	long live = dynamos_shadow_live(PIPE_BYTES);

	proc_remove(entry);
	dynamos_shadow_free_all(PIPE_BYTES);
	pr_info("dynamos pipe-bytes: reverted, freed %ld shadow(s) of live tasks\n", live);
}
