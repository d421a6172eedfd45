// SPDX-License-Identifier: GPL-2.0
/*
 * Test module for dynamos' consistency tests: a writer thread and a reader thread share one
 * slot. The format of this module's code keeps the slot's low bit clear; an update may change
 * the format (set the bit) in new editions of both functions. The reader counts every value
 * it finds in the other format: a mixed-edition encounter.
 */
#include <linux/delay.h>
#include <linux/kthread.h>
#include <linux/module.h>

static u64 pair_slot;
static unsigned long pair_reads, pair_mixed;
module_param_named(reads, pair_reads, ulong, 0444);
module_param_named(mixed, pair_mixed, ulong, 0444);

static struct task_struct *writer, *reader;

noinline void dynamos_pair_write(u64 value)
{
	WRITE_ONCE(pair_slot, value << 1);
}

noinline void dynamos_pair_read(void)
{
	u64 value = READ_ONCE(pair_slot);

	pair_reads++;
	if (value & 1)
		pair_mixed++;
}

static int writer_main(void *unused)
{
	u64 n = 0;

	while (!kthread_should_stop()) {
		dynamos_pair_write(++n);
		usleep_range(100, 200);
	}
	return 0;
}

static int reader_main(void *unused)
{
	while (!kthread_should_stop()) {
		dynamos_pair_read();
		usleep_range(100, 200);
	}
	return 0;
}

static int __init pair_init(void)
{
	writer = kthread_run(writer_main, NULL, "dynamos-pair-w");
	if (IS_ERR(writer))
		return PTR_ERR(writer);
	reader = kthread_run(reader_main, NULL, "dynamos-pair-r");
	if (IS_ERR(reader)) {
		kthread_stop(writer);
		return PTR_ERR(reader);
	}
	return 0;
}

static void __exit pair_exit(void)
{
	kthread_stop(reader);
	kthread_stop(writer);
}

module_init(pair_init);
module_exit(pair_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("dynamos test: writer and reader threads sharing a formatted slot");
