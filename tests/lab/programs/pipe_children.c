/* Start N short-lived children, one after another; each writes 3 bytes to a pipe and exits. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = atol(argv[1]), i, got = 0;
	int fds[2];
	char buf[64];

	if (pipe(fds))
		return 1;
	for (i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid < 0)
			return 1;
		if (pid == 0)
			_exit(write(fds[1], "abc", 3) == 3 ? 0 : 1);
		waitpid(pid, NULL, 0);
		got += read(fds[0], buf, sizeof(buf));
	}
	printf("%ld\n", got);
	return got == 3 * n ? 0 : 1;
}
