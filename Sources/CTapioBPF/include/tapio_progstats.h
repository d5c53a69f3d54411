/* The process's own BPF programs as the kernel counts them.
 *
 * Every program the agent loaded holds a file descriptor in the process
 * (anon_inode:bpf-prog); the kernel keeps, per program, how often it ran and
 * for how long (only while BPF statistics are on: the sysctl
 * kernel.bpf_stats_enabled, or a BPF_ENABLE_STATS descriptor somewhere) and
 * how often it was skipped because it was already running on that CPU
 * (recursion misses, kernel 5.12 and later). Found by walking /proc/self/fd,
 * so no loader needs an accessor and other processes' programs never show.
 */
#ifndef TAPIO_PROGSTATS_H
#define TAPIO_PROGSTATS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct tapio_prog_stats {
	uint32_t id;
	/* The kernel's name: the function's name cut to 15 characters. */
	char name[16];
	uint64_t run_count;
	uint64_t run_time_ns;
	uint64_t recursion_misses;
};

/* Fills up to max entries, one per program (several descriptors of one
 * program count once). Returns the number of programs found (it may exceed
 * max), or -errno when /proc/self/fd cannot be read. */
int tapio_prog_stats_self(struct tapio_prog_stats *out, int max);

/* Turns on run counts and times for every program of the machine until the
 * returned descriptor is closed (BPF_ENABLE_STATS, kernel 5.8 and later),
 * without the sysctl. The descriptor, or -errno. */
int tapio_prog_stats_enable(void);

/* kernel.bpf_stats_enabled: 1 or 0, or -errno when unreadable. Stays 0
 * while only descriptors from tapio_prog_stats_enable() turn counting on. */
int tapio_prog_stats_enabled(void);

#ifdef __cplusplus
}
#endif

#endif
