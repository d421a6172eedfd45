// SPDX-License-Identifier: GPL-2.0
/* The tagged format of dynamos_pair's slot: its low bit set. The reader counts untagged values. */
#include <linux/compiler.h>
#include <linux/types.h>

extern u64 pair_slot;
extern unsigned long pair_reads, pair_mixed;

void pair_write_tagged(u64 value)
{
	WRITE_ONCE(pair_slot, (value << 1) | 1);
}

void pair_read_tagged(void)
{
	u64 value = READ_ONCE(pair_slot);

	pair_reads++;
	if (!(value & 1))
		pair_mixed++;
}

/* Runs with every CPU stopped, at the instant the editions change: convert the slot. */
void pair_convert(bool to_new)
{
	pair_slot = to_new ? pair_slot | 1 : pair_slot & ~1ULL;
}
