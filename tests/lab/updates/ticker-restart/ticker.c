// SPDX-License-Identifier: GPL-2.0
/*
 * Edition 2 of dynamos_ticker's main loop keeps its state in a new structure (the count plus the
 * generation that wrote it). The restart hooks stop the running thread at its loop's
 * kthread_should_stop() check, convert the state and start the thread on the other edition.
 */
#include <linux/err.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/slab.h>

struct ticker_state {		/* the module's format, edition 1 */
	unsigned long iterations;
};

struct ticker_state_v2 {
	u64 iterations;
	u64 generation;
};

extern struct ticker_state dynamos_ticker_state;
extern struct task_struct *dynamos_ticker_task;
extern int dynamos_ticker_refuse;
extern void dynamos_ticker_publish(unsigned long count, int by_edition);
extern void dynamos_ticker_enter(void);
extern void dynamos_ticker_leave(void);

static struct ticker_state_v2 *state_v2;
static bool had_thread;

int ticker_main_v2(void *data)
{
	struct ticker_state_v2 *state = data;

	dynamos_ticker_enter();
	while (!kthread_should_stop()) {
		state->iterations++;
		dynamos_ticker_publish(state->iterations, (int)state->generation);
		usleep_range(1000, 2000);
	}
	dynamos_ticker_leave();
	return 0;
}

int ticker_stop(void)
{
	struct task_struct *task = dynamos_ticker_task;

	had_thread = task != NULL;
	if (task) {
		kthread_stop(task);
		dynamos_ticker_task = NULL;
	}
	return 0;
}

int ticker_transfer(bool to_new)
{
	if (to_new) {
		state_v2 = kzalloc(sizeof(*state_v2), GFP_KERNEL);
		if (!state_v2)
			return -ENOMEM;
		state_v2->iterations = dynamos_ticker_state.iterations;
		state_v2->generation = 2;
	} else if (state_v2) {
		dynamos_ticker_state.iterations = state_v2->iterations;
		kfree(state_v2);
		state_v2 = NULL;
	}
	return 0;
}

int ticker_start(int (*threadfn)(void *))
{
	struct task_struct *task;

	if (!had_thread)
		return 0;
	if (state_v2 && READ_ONCE(dynamos_ticker_refuse))
		return -EAGAIN;
	task = kthread_run(threadfn, state_v2 ? (void *)state_v2 : &dynamos_ticker_state, "dynamos_ticker");
	if (IS_ERR(task))
		return PTR_ERR(task);
	dynamos_ticker_task = task;
	return 0;
}
