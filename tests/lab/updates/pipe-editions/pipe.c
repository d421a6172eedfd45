// SPDX-License-Identifier: GPL-2.0-only
/*
 * Editions of pipe_write that keep its contract (bytes written, or an error when none were)
 * but reach the kernel's own code by other paths, so switching among them under a running
 * transfer shows whether a stream survives.
 */
#include <linux/fs.h>
#include <linux/minmax.h>
#include <linux/slab.h>
#include <linux/uio.h>

ssize_t dynamos_original__pipe_write(struct kiocb *iocb, struct iov_iter *from);

#define BOUNCE_SIZE (16 * PAGE_SIZE)

/* Edition 1: hand the original at most a page at a time. */
ssize_t pipe_write_chunked(struct kiocb *iocb, struct iov_iter *from)
{
	ssize_t written = 0, ret = 0;

	while (iov_iter_count(from)) {
		size_t chunk = min_t(size_t, iov_iter_count(from), PAGE_SIZE);
		size_t rest = iov_iter_count(from) - chunk;

		iov_iter_truncate(from, chunk);
		ret = dynamos_original__pipe_write(iocb, from);
		iov_iter_reexpand(from, iov_iter_count(from) + rest);
		if (ret <= 0)
			break;
		written += ret;
		if ((size_t)ret < chunk)
			break;
	}
	return written ? written : ret;
}

/* Edition 2: copy the caller's bytes into a kernel buffer and write from there. */
ssize_t pipe_write_bounced(struct kiocb *iocb, struct iov_iter *from)
{
	size_t len = min_t(size_t, iov_iter_count(from), BOUNCE_SIZE);
	struct iov_iter bounce;
	struct kvec vec;
	size_t copied;
	ssize_t ret;
	void *buf;

	if (!len)
		return dynamos_original__pipe_write(iocb, from);
	buf = kmalloc(len, GFP_KERNEL);
	if (!buf)
		return -ENOMEM;
	copied = copy_from_iter(buf, len, from);
	if (!copied) {
		kfree(buf);
		return -EFAULT;
	}
	vec.iov_base = buf;
	vec.iov_len = copied;
	iov_iter_kvec(&bounce, ITER_SOURCE, &vec, 1, copied);
	ret = dynamos_original__pipe_write(iocb, &bounce);
	/* Give back to the caller's iterator what the pipe did not take. */
	if (ret < (ssize_t)copied)
		iov_iter_revert(from, copied - max_t(ssize_t, ret, 0));
	kfree(buf);
	return ret;
}
