/* The ABI between the BPF programs (bpf/<name>.bpf.c) and the agent.
 *
 * One record type travels through the ring buffer: struct tapio_event, a fixed
 * header followed by a per-kind union. Both sides include this file; the
 * static asserts below and TapioBPFTests check that they agree on sizes and
 * offsets. Only fixed-width types: this header is compiled by clang -target bpf
 * and by the host compiler.
 */
#ifndef TAPIO_EVENTS_H
#define TAPIO_EVENTS_H

#ifdef __TAPIO_BPF__
/* vmlinux.h provides __u8 .. __u64 */
#elif defined(__linux__)
/* The kernel's own definitions, so that this header can be included together
 * with libbpf's and other uapi headers: typedefs from stdint.h would clash
 * with them (__u64 is unsigned long long there, uint64_t is unsigned long). */
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
typedef int64_t __s64;
#endif

#define TAPIO_COMM_LEN 16
#define TAPIO_PATH_LEN 256

/* Same numbering as tapio.v1.EventKind in proto/tapio.proto. */
enum tapio_event_kind {
	TAPIO_KIND_UNSPECIFIED = 0,
	TAPIO_KIND_PROCESS_EXEC = 1,
	TAPIO_KIND_PROCESS_EXIT = 2,
	TAPIO_KIND_OOM_KILL = 3,
	TAPIO_KIND_TCP_CONNECT = 4,
	TAPIO_KIND_TCP_LISTEN = 5,
	TAPIO_KIND_TCP_RESET = 6,
	TAPIO_KIND_TCP_RETRANSMIT = 7,
	TAPIO_KIND_TCP_LATENCY = 8,
	TAPIO_KIND_PACKET_DROP = 9,
	TAPIO_KIND_DNS = 10,
	TAPIO_KIND_CPU_THROTTLE = 11,
	TAPIO_KIND_MEMORY_PRESSURE = 12,
	TAPIO_KIND_IO_ERROR = 13,
	TAPIO_KIND_MAX = 14,
};

/* Reasons an event is lost inside the kernel; index of the drop counter map
 * is kind * TAPIO_DROP_REASON_MAX + reason. */
enum tapio_drop_reason {
	TAPIO_DROP_RINGBUF_FULL = 0,
	TAPIO_DROP_RATE_LIMITED = 1,
	TAPIO_DROP_MAP_FULL = 2,       /* an aggregation map had no room for a new key */
	TAPIO_DROP_REASON_MAX = 3,
};

struct tapio_exec_info {
	__u8 filename[TAPIO_PATH_LEN];
};

struct tapio_exit_info {
	__s32 exit_code; /* (task->exit_code >> 8) & 0xff */
	__s32 signal;    /* task->exit_code & 0x7f */
	__u32 core_dumped;
	__u32 _pad;
};

struct tapio_oom_info {
	__u32 victim_pid;
	__u32 victim_uid;
	__u64 total_vm_kb;
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u8 victim_comm[TAPIO_COMM_LEN];
};

/* Connection-level TCP facts. Addresses are in network order in the first 4
 * (AF_INET) or 16 (AF_INET6) bytes; ports in host order. */
enum tapio_tcp_op {
	TAPIO_TCP_CONNECT = 1,  /* kind TCP_CONNECT: outcome, latency_ns, error */
	TAPIO_TCP_LISTEN = 2,   /* kind TCP_LISTEN: state 1 open, 0 closed (saddr/sport = listen address) */
	TAPIO_TCP_RESET = 3,    /* kind TCP_RESET: direction 1 sent, 0 received; state = socket state */
};

enum tapio_connect_outcome {
	TAPIO_CONNECT_ESTABLISHED = 1,
	TAPIO_CONNECT_REFUSED = 2,
	TAPIO_CONNECT_TIMEOUT = 3,
	TAPIO_CONNECT_RESET = 4,
	TAPIO_CONNECT_ERROR = 5,
};

struct tapio_tcp_info {
	__u16 family;    /* AF_INET 2, AF_INET6 10 */
	__u16 sport;
	__u16 dport;
	__u8 op;         /* enum tapio_tcp_op */
	__u8 outcome;    /* enum tapio_connect_outcome (connect) */
	__u8 saddr[16];
	__u8 daddr[16];
	__u64 latency_ns;
	__s32 error;     /* sk_err (errno) at the end of a handshake */
	__u32 netns;     /* network namespace inode */
	__u32 count;     /* attempts folded into this record, >= 1 */
	__u8 state;      /* listen: 1 open / 0 closed; reset: TCP state of the socket */
	__u8 direction;  /* reset: 1 sent, 0 received */
	__u16 _pad;
};

#define TAPIO_DNS_NAME_LEN 128

/* One DNS answer matched to its query (or a query that got none). */
struct tapio_dns_info {
	__u16 family;
	__u16 server_port;
	__u16 id;
	__u16 qtype;
	__s32 rcode;     /* -1: no answer (timeout) */
	__u32 netns;
	__u64 latency_ns;
	__u8 server[16];
	__u8 answers[4][16]; /* up to four A/AAAA answers */
	__u8 answer_families[4]; /* 0 unused, 2 A, 10 AAAA */
	__u32 _pad;
	__u8 name[TAPIO_DNS_NAME_LEN]; /* dotted, NUL-terminated */
};

struct tapio_event {
	__u32 kind;      /* enum tapio_event_kind */
	__u32 pid;       /* tgid of the task the event is about */
	__u32 tid;
	__u32 ppid;      /* tgid of the real parent */
	__u32 uid;
	__u32 _pad;
	__u64 ts_ns;     /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup_id; /* cgroup v2 id of the task */
	/* Kernfs id of the task's memory-controller cgroup (the inode of its
	 * directory in the memory hierarchy): on a v1 or hybrid host, where the
	 * v2 tree may hold nothing, the id that names the container. 0 when the
	 * record has no task context or the kernel has no memory controller. */
	__u64 mem_cgroup_id;
	__u8 comm[TAPIO_COMM_LEN];
	union {
		struct tapio_exec_info exec;
		struct tapio_exit_info exit;
		struct tapio_oom_info oom;
		struct tapio_tcp_info tcp;
		struct tapio_dns_info dns;
	} u;
};

#define TAPIO_EVENT_HEADER_SIZE 64
#define TAPIO_EVENT_SIZE (TAPIO_EVENT_HEADER_SIZE + TAPIO_PATH_LEN)

_Static_assert(sizeof(struct tapio_exit_info) == 16, "tapio_exit_info layout");
_Static_assert(sizeof(struct tapio_oom_info) == 48, "tapio_oom_info layout");
_Static_assert(sizeof(struct tapio_tcp_info) == 64, "tapio_tcp_info layout");
_Static_assert(sizeof(struct tapio_dns_info) == 240, "tapio_dns_info layout");
_Static_assert(__builtin_offsetof(struct tapio_event, comm) == 48, "tapio_event.comm offset");
_Static_assert(__builtin_offsetof(struct tapio_event, u) == TAPIO_EVENT_HEADER_SIZE, "tapio_event.u offset");
_Static_assert(sizeof(struct tapio_event) == TAPIO_EVENT_SIZE, "tapio_event size");

#endif
