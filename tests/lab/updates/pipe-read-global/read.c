// SPDX-License-Identifier: GPL-2.0-only
/* pipe_read as the kernel has it, behind a counter: a reader blocked on an empty pipe stays inside. */
#include <linux/atomic.h>
#include <linux/fs.h>
#include <linux/uio.h>

ssize_t dynamos_original__pipe_read(struct kiocb *iocb, struct iov_iter *to);

static atomic_long_t reads;

ssize_t pipe_read_counted(struct kiocb *iocb, struct iov_iter *to)
{
	atomic_long_inc(&reads);
	return dynamos_original__pipe_read(iocb, to);
}
