/* The exec storm: new processes as fast as the machine makes them.
 *
 * Each of P workers runs PROGRAM (default: exit0 beside this binary, a static
 * program that only exits) with vfork() and execve() in a loop, waiting for
 * each child, for D seconds. Every child is one process_exec and one
 * process_exit record for the agent.
 *
 * Usage: execstorm [-d SECONDS] [-p WORKERS] [PROGRAM]
 * Prints "execs=N failed=F seconds=S" on stdout.
 */
#define _GNU_SOURCE
#include <libgen.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	double duration = 5;
	int workers = 1, opt;
	char program[PATH_MAX];

	while ((opt = getopt(argc, argv, "d:p:")) != -1) {
		switch (opt) {
		case 'd': duration = atof(optarg); break;
		case 'p': workers = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-d SECONDS] [-p WORKERS] [PROGRAM]\n", argv[0]);
			return 2;
		}
	}
	if (optind < argc) {
		snprintf(program, sizeof(program), "%s", argv[optind]);
	} else {
		char self[PATH_MAX];
		ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
		if (n <= 0)
			return 1;
		self[n] = 0;
		snprintf(program, sizeof(program), "%s/exit0", dirname(self));
	}
	if (workers < 1 || workers > 64 || duration <= 0 || access(program, X_OK) != 0) {
		fprintf(stderr, "execstorm: bad arguments (1..64 workers, seconds > 0, %s executable)\n", program);
		return 2;
	}
	/* Per-worker counts, shared with the parent. */
	uint64_t *counts = mmap(NULL, 2 * 64 * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (counts == MAP_FAILED)
		return 1;
	double start = now();
	for (int w = 0; w < workers; w++) {
		if (fork() != 0)
			continue;
		char *args[] = {program, NULL};
		char *env[] = {NULL};
		uint64_t execs = 0, failed = 0;
		while (now() - start < duration) {
			int status;
			pid_t pid = vfork();
			if (pid == 0) {
				execve(program, args, env);
				_exit(127);
			}
			if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
				failed++;
			else
				execs++;
		}
		counts[2 * w] = execs;
		counts[2 * w + 1] = failed;
		_exit(0);
	}
	uint64_t execs = 0, failed = 0;
	for (int w = 0; w < workers; w++)
		wait(NULL);
	for (int w = 0; w < workers; w++) {
		execs += counts[2 * w];
		failed += counts[2 * w + 1];
	}
	printf("execs=%llu failed=%llu seconds=%.3f\n", (unsigned long long)execs, (unsigned long long)failed, now() - start);
	return 0;
}
