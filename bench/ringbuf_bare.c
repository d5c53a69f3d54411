/* The bare ring-buffer consumer: the ceiling the agent's pipeline is measured
 * against.
 *
 * Loads the agent's own process object (the skeleton of bpf/process.bpf.c)
 * with only the benchmark program tapio_bench_storm, the same ring size and
 * the same wakeup setting as the agent, and consumes the `events` ring with
 * libbpf's ring_buffer (epoll, then consume), doing nothing per record but
 * counting it. Everything the agent does beyond this (conversion, attribution,
 * batching, TLS, the server) is what the ratio agent / bare measures.
 *
 * Usage: ringbuf_bare [-c COMM] [-d SECONDS] [-r RING_BYTES] [-w WAKEUP_BYTES]
 *   -d 0 (default) runs until SIGINT or SIGTERM.
 *   -r the ring's size, default 4 MiB (the agent's default for its process
 *      ring; bench.sh passes the size the agent reports).
 *   -w the adaptive wakeup fill mark in bytes (wakeup_bytes in
 *      bpf/common.bpf.h); default 1/16 of the ring, the mark the agent sets
 *      by default (tapio_wakeup_mark in Sources/CTapioBPF/shim.c); 0 gives
 *      the kernel's default wakeups.
 * Prints "ready" on stdout once attached; at the end, one line of key=value:
 * records, drops (ringbuf_full of this object), cpu (user+system seconds of
 * this process), seconds (attached to stopped), first_to_last (seconds from
 * the first record to the last), per_second (records over first_to_last).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "tapio_events.h"
#include "process.skel.h"

static volatile sig_atomic_t stopping;
static uint64_t records;
static double first_ns, last_ns;

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int on_record(void *ctx, void *data, size_t size)
{
	(void)ctx;
	(void)data;
	(void)size;
	records++;
	return 0;
}

/* Notes the time around each consume rather than per record. */
static void note_progress(uint64_t before)
{
	if (records == before)
		return;
	double t = now_ns();
	if (before == 0)
		first_ns = t;
	last_ns = t;
}

static int print_libbpf(enum libbpf_print_level level, const char *fmt, va_list args)
{
	return level == LIBBPF_DEBUG ? 0 : vfprintf(stderr, fmt, args);
}

static uint64_t read_drops(struct tapio_process *skel)
{
	int ncpu = libbpf_num_possible_cpus();
	uint32_t key = TAPIO_KIND_PROCESS_EXIT * TAPIO_DROP_REASON_MAX + TAPIO_DROP_RINGBUF_FULL;
	uint64_t *values, total = 0;

	if (ncpu <= 0 || !(values = calloc(ncpu, sizeof(*values))))
		return 0;
	if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.drops), &key, values) == 0)
		for (int i = 0; i < ncpu; i++)
			total += values[i];
	free(values);
	return total;
}

static double cpu_seconds(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	const char *comm = "tapio-storm";
	double duration = 0;
	uint32_t ring_bytes = 4 << 20;
	long long wakeup_bytes = -1;
	struct tapio_process *skel;
	struct bpf_program *prog;
	struct bpf_link *link;
	struct ring_buffer *ring;
	int opt, rc;

	while ((opt = getopt(argc, argv, "c:d:r:w:")) != -1) {
		switch (opt) {
		case 'c': comm = optarg; break;
		case 'd': duration = atof(optarg); break;
		case 'r': ring_bytes = strtoul(optarg, NULL, 0); break;
		case 'w': wakeup_bytes = strtoll(optarg, NULL, 0); break;
		default:
			fprintf(stderr, "usage: %s [-c COMM] [-d SECONDS] [-r RING_BYTES] [-w WAKEUP_BYTES]\n", argv[0]);
			return 2;
		}
	}
	if (strlen(comm) == 0 || strlen(comm) > 15) {
		fprintf(stderr, "ringbuf_bare: the comm must have 1 to 15 bytes\n");
		return 2;
	}
	libbpf_set_print(print_libbpf);
	skel = tapio_process__open();
	if (!skel) {
		fprintf(stderr, "ringbuf_bare: open: %s\n", strerror(errno));
		return 1;
	}
	bpf_object__for_each_program(prog, skel->obj)
		bpf_program__set_autoload(prog, prog == skel->progs.tapio_bench_storm);
	memset((char *)skel->rodata->bench_comm, 0, sizeof(skel->rodata->bench_comm));
	memcpy((char *)skel->rodata->bench_comm, comm, strlen(comm));
	skel->rodata->wakeup_bytes = wakeup_bytes < 0 ? ring_bytes / 16 : (uint64_t)wakeup_bytes;
	rc = bpf_map__set_max_entries(skel->maps.events, ring_bytes);
	if (rc == 0)
		rc = tapio_process__load(skel);
	if (rc) {
		fprintf(stderr, "ringbuf_bare: load: %s\n", strerror(-rc));
		tapio_process__destroy(skel);
		return 1;
	}
	link = bpf_program__attach(skel->progs.tapio_bench_storm);
	if (!link) {
		fprintf(stderr, "ringbuf_bare: attach tapio_bench_storm: %s\n", strerror(errno));
		tapio_process__destroy(skel);
		return 1;
	}
	ring = ring_buffer__new(bpf_map__fd(skel->maps.events), on_record, NULL, NULL);
	if (!ring) {
		fprintf(stderr, "ringbuf_bare: ring_buffer__new: %s\n", strerror(errno));
		bpf_link__destroy(link);
		tapio_process__destroy(skel);
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	double cpu_before = cpu_seconds();
	double start = now_ns();
	printf("ready wakeup_bytes=%llu ring_bytes=%u\n", (unsigned long long)skel->rodata->wakeup_bytes, ring_bytes);
	fflush(stdout);
	while (!stopping && (duration <= 0 || now_ns() - start < duration * 1e9)) {
		uint64_t before = records;
		/* Below the wakeup mark the kernel sends no wakeup: a timeout
		 * consumes what the last records left there. */
		rc = ring_buffer__poll(ring, 100);
		if (rc == 0)
			rc = ring_buffer__consume(ring);
		if (rc < 0 && rc != -EINTR) {
			fprintf(stderr, "ringbuf_bare: poll: %s\n", strerror(-rc));
			break;
		}
		note_progress(before);
	}
	double stopped = now_ns();
	uint64_t before = records;
	ring_buffer__consume(ring);
	note_progress(before);
	double active = records ? (last_ns - first_ns) / 1e9 : 0.0;
	printf("records=%llu drops=%llu cpu=%.3f seconds=%.3f first_to_last=%.3f per_second=%.0f\n",
	       (unsigned long long)records, (unsigned long long)read_drops(skel), cpu_seconds() - cpu_before,
	       (stopped - start) / 1e9, active, active > 0 ? records / active : 0.0);
	ring_buffer__free(ring);
	bpf_link__destroy(link);
	tapio_process__destroy(skel);
	return 0;
}
