// SPDX-License-Identifier: GPL-2.0-only
/*
 * dynamos edition runtime: restarting kernel threads onto and off the update's code (see
 * struct dynamos_kthread). While a thread runs the update's code this module holds a
 * reference on itself; an earlier update whose copy a thread ran is told to drop its own.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/timekeeping.h>
#include "dynamos_internal.h"

typedef int (*dynamos_threadfn)(void *data);

/* One side a thread may run on: the code it runs there, and how to say so. */
struct thread_side {
	dynamos_threadfn threadfn;
	const char *what;
};

/* The earlier update whose copy of this function the kernel thread runs now, if any. */
static struct dynamos_function *thread_holder(struct dynamos_function *fn)
{
	struct dynamos_function *prior = fn->prior;

	if (!prior || !prior->kthread || !READ_ONCE(prior->kthread->on_new))
		return NULL;
	return prior;
}

/* The thread left the earlier update's code for ours: that update lets go of it. */
static void release_holder(struct dynamos_function *fn, struct dynamos_function *holder)
{
	WRITE_ONCE(holder->kthread->on_new, false);
	if (fn->prior_version >= 2) {
		pr_info("%s: thread taken over from %s\n", fn->name, module_name(holder->module));
		module_put(holder->module);
	} else {
		pr_warn("%s: thread taken over from an update of runtime version %u, which cannot be told to let go of its module\n",
			fn->name, fn->prior_version);
	}
}

/*
 * Move one kernel thread between the kernel's code and the update's: stop it, carry its state
 * across, start it on the other side. Any failure puts it back where it was (state included)
 * and returns the error; only when even that fails is the thread left stopped, said loudly.
 * Onto the update's code, the thread may come from an earlier update's copy rather than from
 * the kernel's: it goes back there on failure, and that update lets go of it on success.
 */
static int restart_kthread(struct dynamos_function *fn, bool to_new)
{
	struct dynamos_kthread *k = fn->kthread;
	struct dynamos_function *holder = to_new ? thread_holder(fn) : NULL;
	struct thread_side ours = { k->entry, "the update's edition" };
	struct thread_side kernel = { (dynamos_threadfn)fn->original, "the kernel's code" };
	struct thread_side there = to_new ? ours : kernel;
	struct thread_side back = to_new ? kernel : ours;
	u64 start = ktime_get_ns();
	int err, undo;

	if (holder) {
		back.threadfn = holder->kthread->entry;
		back.what = "the earlier update's copy";
	}
	if (k->on_new == to_new)
		return 0;
	err = k->stop();
	if (err) {
		pr_err("%s: the thread's stop hook failed (%d); it keeps running %s\n",
		       fn->name, err, back.what);
		goto out;
	}
	if (k->transfer) {
		err = k->transfer(to_new);
		if (err) {
			pr_err("%s: the state transfer failed (%d)\n", fn->name, err);
			goto restore;
		}
	}
	if (to_new)
		__module_get(THIS_MODULE);	/* the thread is about to run this module's code */
	err = k->start(there.threadfn);
	if (!err) {
		if (!to_new)
			module_put(THIS_MODULE);
		if (holder)
			release_holder(fn, holder);
		WRITE_ONCE(k->on_new, to_new);
		WRITE_ONCE(k->restarts, k->restarts + 1);
		WRITE_ONCE(k->last_restart_ns, ktime_get_ns() - start);
		pr_info("%s: thread restarted onto %s in %llu us\n", fn->name, there.what,
			(ktime_get_ns() - start) / NSEC_PER_USEC);
		goto out;
	}
	if (to_new)
		module_put(THIS_MODULE);
	pr_err("%s: the thread's start hook failed (%d) starting it on %s\n",
	       fn->name, err, there.what);
	if (k->transfer && k->transfer(!to_new))
		pr_err("%s: carrying the state back failed too\n", fn->name);
restore:
	undo = k->start(back.threadfn);
	if (undo)
		pr_crit("%s: the thread could not be restarted on either side (%d): it is stopped\n",
			fn->name, undo);
	else
		pr_info("%s: thread restarted back onto %s\n", fn->name, back.what);
out:
	WRITE_ONCE(k->last_error, err);
	return err;
}

int dynamos_kthreads_to_new(struct dynamos_function **fns, int count)
{
	int i, err = 0;

	for (i = 0; i < count && !err; i++)
		if (fns[i]->kthread)
			err = restart_kthread(fns[i], true);
	if (err)
		for (i -= 2; i >= 0; i--)	/* the failed one has put itself back already */
			if (fns[i]->kthread)
				restart_kthread(fns[i], false);
	for (i = 0; i < count; i++)
		fns[i]->prior = NULL;	/* the earlier update may go away from now on */
	return err;
}

/*
 * Called before unpatching and again after (a reversed or cancelled transition calls only the
 * latter). When the patched module itself is going away, its exit has stopped its threads:
 * there is nothing to restart, only the module reference to drop.
 */
void dynamos_kthreads_to_original(struct dynamos_function **fns, int count,
				  struct klp_object *obj)
{
	bool going = obj && obj->mod && obj->mod->state == MODULE_STATE_GOING;
	struct dynamos_kthread *k;
	int i;

	for (i = count - 1; i >= 0; i--) {
		k = fns[i]->kthread;
		if (!k || !k->on_new)
			continue;
		if (going) {
			WRITE_ONCE(k->on_new, false);
			module_put(THIS_MODULE);
		} else if (restart_kthread(fns[i], false)) {
			pr_err("%s: the thread still runs this update's code; the update module stays loaded\n",
			       fns[i]->name);
		}
	}
}
