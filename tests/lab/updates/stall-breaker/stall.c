// SPDX-License-Identifier: GPL-2.0
#include <linux/delay.h>
#include <linux/kthread.h>

int dynamos_stall_loop_v2(void)
{
	while (!kthread_should_stop())
		msleep_interruptible(20);
	return 0;
}
