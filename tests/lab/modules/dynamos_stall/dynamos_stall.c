// SPDX-License-Identifier: GPL-2.0
/*
 * Test module for dynamos' lab tests: a kernel thread that never leaves
 * dynamos_stall_loop(), so a live update of that function can never finish its
 * transition (the thread is always on the function's stack).  Unloading the module
 * stops the thread.
 */
#include <linux/delay.h>
#include <linux/kthread.h>
#include <linux/module.h>

static struct task_struct *stall_thread;
static atomic_t stall_laps = ATOMIC_INIT(0);
module_param_named(laps, stall_laps.counter, int, 0444);

noinline int dynamos_stall_loop(void)
{
	while (!kthread_should_stop()) {
		atomic_inc(&stall_laps);
		msleep_interruptible(20);
	}
	return 0;
}

/* Not a tail call: the thread's main function stays on its stack below dynamos_stall_loop(), so
 * the blocked function is one the thread calls, not its main loop (see the dynamos_ticker module). */
static int stall_main(void *unused)
{
	int ret = dynamos_stall_loop();

	pr_info("dynamos_stall: stopped after %d laps\n", atomic_read(&stall_laps));
	return ret;
}

static int __init stall_init(void)
{
	stall_thread = kthread_run(stall_main, NULL, "dynamos-stall");
	return PTR_ERR_OR_ZERO(stall_thread);
}

static void __exit stall_exit(void)
{
	kthread_stop(stall_thread);
}

module_init(stall_init);
module_exit(stall_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dynamos lab test: a kthread that always sits in dynamos_stall_loop()");
