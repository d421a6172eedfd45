// SPDX-License-Identifier: GPL-2.0
/*
 * Test module for dynamos' kernel-thread restarts: one kernel thread counts the iterations of
 * its loop and never returns until stopped. Its state (the count) lives in a structure handed to
 * the thread; every iteration publishes the count through dynamos_ticker_publish(), which notes
 * any count that does not follow the previous one (a lost or repeated iteration), and the thread
 * marks itself in and out, so two threads running at once would show.
 */
#include <linux/atomic.h>
#include <linux/delay.h>
#include <linux/kthread.h>
#include <linux/module.h>

struct ticker_state {
	unsigned long iterations;
};

struct ticker_state dynamos_ticker_state;
struct task_struct *dynamos_ticker_task;	/* the running thread: restart hooks replace it */

static unsigned long published;
static int edition;
static unsigned long gaps;
static atomic_t running = ATOMIC_INIT(0);
static int most_running;
int dynamos_ticker_refuse;			/* tests ask an update's start hook to fail */

module_param_named(iterations, published, ulong, 0444);
module_param_named(edition, edition, int, 0444);
module_param_named(gaps, gaps, ulong, 0444);
module_param_named(most_running, most_running, int, 0444);
module_param_named(refuse_restart, dynamos_ticker_refuse, int, 0644);

noinline void dynamos_ticker_publish(unsigned long count, int by_edition)
{
	if (count != published + 1)
		gaps++;
	WRITE_ONCE(published, count);
	WRITE_ONCE(edition, by_edition);
}

noinline void dynamos_ticker_enter(void)
{
	int now = atomic_inc_return(&running);

	if (now > most_running)
		WRITE_ONCE(most_running, now);
}

noinline void dynamos_ticker_leave(void)
{
	atomic_dec(&running);
}

noinline int dynamos_ticker_main(void *data)
{
	struct ticker_state *state = data;

	dynamos_ticker_enter();
	while (!kthread_should_stop()) {
		state->iterations++;
		dynamos_ticker_publish(state->iterations, 1);
		usleep_range(1000, 2000);
	}
	dynamos_ticker_leave();
	return 0;
}

static int __init ticker_init(void)
{
	struct task_struct *task = kthread_run(dynamos_ticker_main, &dynamos_ticker_state, "dynamos_ticker");

	if (IS_ERR(task))
		return PTR_ERR(task);
	dynamos_ticker_task = task;
	return 0;
}

static void __exit ticker_exit(void)
{
	if (dynamos_ticker_task)
		kthread_stop(dynamos_ticker_task);
}

module_init(ticker_init);
module_exit(ticker_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dynamos test: a kernel thread counting its loop's iterations");
