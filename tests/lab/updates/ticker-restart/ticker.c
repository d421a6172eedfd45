// SPDX-License-Identifier: GPL-2.0
/*
 * Edition 2 of dynamos_ticker's main loop keeps its state in a new structure (the count plus the
 * generation that wrote it). The restart hooks stop the running thread at its loop's
 * kthread_should_stop() check, convert the state and start the thread on the other edition.
 * The new structure is a shadow variable of the module's state, so a cumulative update that
 * takes the thread over from this one finds the count where this one's thread left it.
 */
#include <linux/err.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/livepatch.h>
#include <linux/slab.h>

#define TICKER_STATE_V2 0x7469636b32UL	/* shadow id: "tick2" */

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
		/* An earlier update's edition 2 counted here already: carry on from its count. */
		state_v2 = klp_shadow_get(&dynamos_ticker_state, TICKER_STATE_V2);
		if (state_v2)
			return 0;
		state_v2 = klp_shadow_alloc(&dynamos_ticker_state, TICKER_STATE_V2, sizeof(*state_v2), GFP_KERNEL,
					    NULL, NULL);
		if (!state_v2)
			return -ENOMEM;
		state_v2->iterations = dynamos_ticker_state.iterations;
		state_v2->generation = 2;
	} else if (state_v2) {
		dynamos_ticker_state.iterations = state_v2->iterations;
		klp_shadow_free(&dynamos_ticker_state, TICKER_STATE_V2, NULL);
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
