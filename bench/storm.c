/* The per-event storm: getppid() in a tight loop, under a known comm.
 *
 * The benchmark-only BPF program tapio_bench_storm (bpf/process.bpf.c) emits
 * one record for every getppid() made by a task whose comm is bench_comm, so
 * this loop is a record source the kernel cannot fold. Every thread names
 * itself (PR_SET_NAME is per thread) and calls getppid() through syscall(2),
 * so no libc caching can skip the system call.
 *
 * Usage: storm [-c COMM] [-d SECONDS] [-t THREADS]
 * Prints "calls=N seconds=S per_second=R" on stdout when done.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char *comm = "tapio-storm";
static double duration = 5;
static atomic_bool stop;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *worker(void *arg)
{
	uint64_t *calls = arg;
	uint64_t n = 0;

	prctl(PR_SET_NAME, comm, 0, 0, 0);
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		/* The stop flag is read once per 1024 calls' worth of loop. */
		for (int i = 0; i < 1024; i++)
			syscall(SYS_getppid);
		n += 1024;
	}
	*calls = n;
	return NULL;
}

int main(int argc, char **argv)
{
	int threads = 1, opt;

	while ((opt = getopt(argc, argv, "c:d:t:")) != -1) {
		switch (opt) {
		case 'c': comm = optarg; break;
		case 'd': duration = atof(optarg); break;
		case 't': threads = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-c COMM] [-d SECONDS] [-t THREADS]\n", argv[0]);
			return 2;
		}
	}
	if (threads < 1 || threads > 256 || duration <= 0 || strlen(comm) > 15) {
		fprintf(stderr, "storm: bad arguments (1..256 threads, seconds > 0, comm <= 15 bytes)\n");
		return 2;
	}
	pthread_t tids[256];
	uint64_t counts[256] = {0};
	double start = now();
	for (int i = 0; i < threads; i++)
		if (pthread_create(&tids[i], NULL, worker, &counts[i]) != 0) {
			perror("storm: pthread_create");
			return 1;
		}
	struct timespec ts = {(time_t)duration, (long)((duration - (time_t)duration) * 1e9)};
	while (nanosleep(&ts, &ts) != 0)
		;
	atomic_store(&stop, true);
	uint64_t total = 0;
	for (int i = 0; i < threads; i++) {
		pthread_join(tids[i], NULL);
		total += counts[i];
	}
	double secs = now() - start;
	printf("calls=%llu seconds=%.3f per_second=%.0f\n", (unsigned long long)total, secs, total / secs);
	return 0;
}
