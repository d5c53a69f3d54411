#define _GNU_SOURCE
#include "tapio_net.h"
#include "generations.h"
#include "percpu.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/btf.h>
#include <bpf/libbpf.h>

#include "net.skel.h"

#define TAPIO_NET_DEFAULT_RINGBUF_BYTES (256u * 1024u)
#define TAPIO_NET_DEFAULT_INTERVAL_NS 1000000000ull
#define TAPIO_NET_DROP_SLOTS ((size_t)TAPIO_KIND_MAX * (size_t)TAPIO_DROP_REASON_MAX)
/* Size of the kernel's drop_reason_ignored array. */
#define TAPIO_NET_REASON_SLOTS 1024u
/* Per-program verifier log kept for the error message of a failed load. */
#define TAPIO_NET_PROG_LOG 16384
/* Entries moved per bpf_map_lookup_and_delete_batch() call. */
#define TAPIO_NET_BATCH 256u
/* How long a harvest waits for programs still adding to the generation it
 * retired. They take microseconds; only a program preempted mid-event (on a
 * kernel that runs tracepoint programs preemptible) can take longer. After
 * this the generation is left for the next harvest, never emptied early. */
#define TAPIO_NET_RETIRE_WAIT_NS 1000000000ull

/* What each BPF program provides. Several programs may serve one kind. */
static const struct {
	const char *program;
	const char *capability;
	uint32_t kind;
} tapio_net_programs[] = {
	{ "handle_connect_state", "tcp_connect", TAPIO_KIND_TCP_CONNECT },
	{ "handle_listen_state", "tcp_listen", TAPIO_KIND_TCP_LISTEN },
	{ "handle_send_reset", "tcp_reset", TAPIO_KIND_TCP_RESET },
	{ "handle_receive_reset", "tcp_reset", TAPIO_KIND_TCP_RESET },
	{ "handle_retransmit", "tcp_retransmit", TAPIO_KIND_TCP_RETRANSMIT },
	{ "handle_latency_state", "tcp_latency", TAPIO_KIND_TCP_LATENCY },
	{ "handle_send_length", "tcp_latency", TAPIO_KIND_TCP_LATENCY },
	{ "handle_recv_length", "tcp_latency", TAPIO_KIND_TCP_LATENCY },
	{ "handle_kfree_skb", "packet_drop", TAPIO_KIND_PACKET_DROP },
};

#define TAPIO_NET_PROGRAMS (sizeof(tapio_net_programs) / sizeof(tapio_net_programs[0]))

/* Drop reasons that are housekeeping, not failures (docs/events.md). Names
 * of enum skb_drop_reason; those the running kernel lacks are skipped.
 * The TCP ones discard segments the receiver already has or that arrived
 * reordered: duplicates of a (possibly spurious) retransmission, which the
 * sender reports as tcp_retransmit, and pure ACKs that failed PAWS after
 * reordering across TX queues (the kernel names that reason so it can be told
 * apart as harmless). Counted as drops they made healthy traffic look like
 * packet loss. */
static const char *const tapio_net_routine_reasons[] = {
	"SKB_NOT_DROPPED_YET",
	"SKB_CONSUMED",
	"SKB_DROP_REASON_NOT_SPECIFIED",
	"SKB_DROP_REASON_SOCKET_CLOSE",
	"SKB_DROP_REASON_UNIX_DISCONNECT",
	"SKB_DROP_REASON_UNIX_SKIP_OOB",
	"SKB_DROP_REASON_QUEUE_PURGE",
	"SKB_DROP_REASON_OTHERHOST",
	"SKB_DROP_REASON_TCP_OLD_DATA",
	"SKB_DROP_REASON_TCP_OLD_SEQUENCE",
	"SKB_DROP_REASON_TCP_OLD_ACK",
	"SKB_DROP_REASON_TCP_RFC7323_PAWS_ACK",
};

struct tapio_net_program {
	struct bpf_program *prog;
	struct bpf_link *link;
	bool excluded; /* not loaded: disabled, or failed to load */
	char error[240];
};

struct tapio_net_handle {
	struct tapio_net *skel;
	uint32_t ringbuf_bytes;
	struct tapio_net_program programs[TAPIO_NET_PROGRAMS];

	uint64_t interval_ns;
	uint64_t interval_start_ns;
	uint64_t next_harvest_ns;

	/* enum skb_drop_reason names by value, prefix stripped; NULL holes. */
	char **reason_names;
	uint32_t reason_count;

	/* Harvest buffers, sized for the largest key and value. */
	void *keys;
	void *values;

	/* Double buffering (see tapio_net_harvest()): the generation the
	 * programs write into, and whether the other one still holds entries
	 * (its retirement timed out, or its drain failed). */
	uint32_t gen;
	bool retired_pending;
};

static uint64_t tapio_net_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool tapio_net_valid_ringbuf(uint32_t bytes)
{
	long page = sysconf(_SC_PAGESIZE);

	return bytes != 0 && (bytes & (bytes - 1)) == 0 && page > 0 && bytes % (uint32_t)page == 0;
}

static void tapio_net_err(char *err, size_t len, const char *what, int rc)
{
	if (err && len)
		snprintf(err, len, "%s: %s", what, strerror(rc < 0 ? -rc : rc));
}

/* The last line of a verifier log that is not its statistics: where it
 * says why. */
static void tapio_net_log_tail(const char *log, char *out, size_t len)
{
	const char *end = log + strlen(log);
	const char *start;

	out[0] = '\0';
	while (end > log) {
		while (end > log && (end[-1] == '\n' || end[-1] == ' '))
			end--;
		start = end;
		while (start > log && start[-1] != '\n')
			start--;
		if (end > start && strncmp(start, "processed ", 10) != 0 && strncmp(start, "verification time", 17) != 0 &&
		    strncmp(start, "stack depth", 11) != 0) {
			snprintf(out, len, "%.*s", (int)(end - start), start);
			return;
		}
		end = start;
	}
}

/* Opens the skeleton and applies the config; programs not in `only`
 * (when only >= 0) or excluded are not loaded. */
static struct tapio_net *tapio_net_open_skel(tapio_net *net, const tapio_net_config *cfg,
					     uint32_t ringbuf_bytes, int only, char logs[][TAPIO_NET_PROG_LOG])
{
	struct tapio_net *skel = tapio_net__open();
	size_t i;

	if (!skel)
		return NULL;
	skel->rodata->cgroup_root_id = cfg->cgroup_root_id;
	skel->rodata->cgroup_root_level = cfg->cgroup_root_level;
	skel->rodata->kinds_disabled_mask = cfg->kinds_disabled_mask;
	skel->rodata->netns_filter = cfg->netns_filter != 0;
	skel->rodata->events_per_sec = cfg->events_per_sec;
	skel->rodata->wakeup_bytes = tapio_wakeup_mark(cfg->wakeup_bytes, ringbuf_bytes);
	if (bpf_map__set_max_entries(skel->maps.events, ringbuf_bytes)) {
		tapio_net__destroy(skel);
		errno = EINVAL;
		return NULL;
	}
	for (i = 0; i < TAPIO_NET_PROGRAMS; i++) {
		struct bpf_program *prog = bpf_object__find_program_by_name(skel->obj, tapio_net_programs[i].program);
		bool load = !net->programs[i].excluded && (only < 0 || (size_t)only == i);

		net->programs[i].prog = prog;
		if (!prog)
			continue;
		bpf_program__set_autoload(prog, load);
		if (logs) {
			logs[i][0] = '\0';
			bpf_program__set_log_buf(prog, logs[i], TAPIO_NET_PROG_LOG);
		}
	}
	return skel;
}

/* Loads all programs not excluded. When that fails, loads each alone to find
 * the ones that fail, excludes them with their reason and loads the rest. */
static int tapio_net_load(tapio_net *net, const tapio_net_config *cfg, uint32_t ringbuf_bytes, char *err,
			  size_t err_len)
{
	char (*logs)[TAPIO_NET_PROG_LOG] = calloc(TAPIO_NET_PROGRAMS, TAPIO_NET_PROG_LOG);
	struct tapio_net *skel;
	size_t i;
	int rc, failed = 0, candidates = 0;

	if (!logs)
		return -ENOMEM;
	skel = tapio_net_open_skel(net, cfg, ringbuf_bytes, -1, logs);
	if (!skel) {
		rc = -errno;
		tapio_net_err(err, err_len, "open BPF object", rc);
		goto out;
	}
	rc = tapio_net__load(skel);
	if (rc == 0) {
		net->skel = skel;
		goto out;
	}
	tapio_net__destroy(skel);

	/* libbpf loads an object once, so every probe is a fresh object. */
	for (i = 0; i < TAPIO_NET_PROGRAMS; i++) {
		char tail[160];
		int one;

		if (net->programs[i].excluded)
			continue;
		candidates++;
		skel = tapio_net_open_skel(net, cfg, ringbuf_bytes, (int)i, logs);
		if (!skel)
			continue;
		one = tapio_net__load(skel);
		tapio_net__destroy(skel);
		if (one == 0)
			continue;
		failed++;
		net->programs[i].excluded = true;
		tapio_net_log_tail(logs[i], tail, sizeof(tail));
		snprintf(net->programs[i].error, sizeof(net->programs[i].error), "load: %s%s%s", strerror(-one),
			 tail[0] ? ": " : "", tail);
	}
	if (failed == 0 || failed == candidates) {
		/* Not one program's fault (maps, BTF), or nothing loads. */
		tapio_net_err(err, err_len, "load BPF programs", rc);
		for (i = 0; failed && err && err_len && i < TAPIO_NET_PROGRAMS; i++) {
			size_t used = strlen(err);

			if (strncmp(net->programs[i].error, "load:", 5) == 0) {
				snprintf(err + used, err_len - used, " (%s: %s)", tapio_net_programs[i].program,
					 net->programs[i].error);
				break;
			}
		}
		rc = rc ? rc : -EINVAL;
		goto out;
	}
	skel = tapio_net_open_skel(net, cfg, ringbuf_bytes, -1, logs);
	if (!skel) {
		rc = -errno;
		tapio_net_err(err, err_len, "open BPF object", rc);
		goto out;
	}
	rc = tapio_net__load(skel);
	if (rc) {
		tapio_net__destroy(skel);
		tapio_net_err(err, err_len, "load BPF programs", rc);
		goto out;
	}
	net->skel = skel;
out:
	free(logs);
	return rc;
}

/* Reads enum skb_drop_reason from kernel BTF: names by value, and marks the
 * routine reasons in the kernel's drop_reason_ignored array. */
static int tapio_net_load_reasons(tapio_net *net)
{
	struct btf *btf = btf__load_vmlinux_btf();
	const struct btf_type *type;
	const struct btf_enum *values;
	int id, fd, i, n;
	uint32_t max = 0;

	if (!btf)
		return -errno;
	id = btf__find_by_name_kind(btf, "skb_drop_reason", BTF_KIND_ENUM);
	if (id < 0) {
		btf__free(btf);
		return 0; /* older kernel: no reasons, packet_drop reports nothing */
	}
	type = btf__type_by_id(btf, id);
	values = btf_enum(type);
	n = btf_vlen(type);
	for (i = 0; i < n; i++)
		if ((uint32_t)values[i].val > max && (uint32_t)values[i].val < 65536)
			max = (uint32_t)values[i].val;
	net->reason_names = calloc((size_t)max + 1, sizeof(char *));
	if (!net->reason_names) {
		btf__free(btf);
		return -ENOMEM;
	}
	net->reason_count = max + 1;
	fd = bpf_map__fd(net->skel->maps.drop_reason_ignored);
	for (i = 0; i < n; i++) {
		const char *name = btf__name_by_offset(btf, values[i].name_off);
		uint32_t value = (uint32_t)values[i].val;
		const char *shown = name;
		size_t r;

		if (!name || value >= net->reason_count)
			continue;
		if (strncmp(name, "SKB_DROP_REASON_", 16) == 0)
			shown = name + 16;
		else if (strncmp(name, "SKB_", 4) == 0)
			shown = name + 4;
		net->reason_names[value] = strdup(shown);
		for (r = 0; r < sizeof(tapio_net_routine_reasons) / sizeof(tapio_net_routine_reasons[0]); r++) {
			uint8_t one = 1;

			if (strcmp(name, tapio_net_routine_reasons[r]) == 0 && value < TAPIO_NET_REASON_SLOTS)
				bpf_map_update_elem(fd, &value, &one, BPF_ANY);
		}
	}
	btf__free(btf);
	return 0;
}

tapio_net *tapio_net_open(const tapio_net_config *config, char *err, size_t err_len)
{
	static const tapio_net_config defaults;
	const tapio_net_config *cfg = config ? config : &defaults;
	uint32_t ringbuf_bytes = cfg->ringbuf_bytes ? cfg->ringbuf_bytes : TAPIO_NET_DEFAULT_RINGBUF_BYTES;
	tapio_net *net;
	size_t i;
	int rc, attached = 0;

	if (err && err_len)
		err[0] = '\0';
	if (!tapio_net_valid_ringbuf(ringbuf_bytes)) {
		if (err && err_len)
			snprintf(err, err_len, "ring buffer size %u: not a power of two multiple of the page size",
				 ringbuf_bytes);
		return NULL;
	}
	rc = tapio_bpf_ensure_tracefs();
	if (rc) {
		tapio_net_err(err, err_len, "mount tracefs", rc);
		return NULL;
	}
	net = calloc(1, sizeof(*net));
	if (!net) {
		tapio_net_err(err, err_len, "allocate", -ENOMEM);
		return NULL;
	}
	net->keys = malloc(TAPIO_NET_BATCH * 64);
	net->values = malloc(TAPIO_NET_BATCH * 96);
	if (!net->keys || !net->values) {
		tapio_net_err(err, err_len, "allocate", -ENOMEM);
		goto fail;
	}
	for (i = 0; i < TAPIO_NET_PROGRAMS; i++) {
		if (cfg->kinds_disabled_mask & (1u << tapio_net_programs[i].kind)) {
			net->programs[i].excluded = true;
			snprintf(net->programs[i].error, sizeof(net->programs[i].error), "disabled by configuration");
		}
	}
	net->ringbuf_bytes = ringbuf_bytes;
	if (tapio_net_load(net, cfg, ringbuf_bytes, err, err_len))
		goto fail;
	if (!net->skel->bss) {
		/* The generation flag and busy counters live there (mmapped
		 * .bss, kernel 5.5+; the ring buffer already needs 5.8). */
		tapio_net_err(err, err_len, "map BPF .bss", -ENOTSUP);
		goto fail;
	}
	rc = tapio_net_load_reasons(net);
	if (rc) {
		tapio_net_err(err, err_len, "read skb_drop_reason from kernel BTF", rc);
		goto fail;
	}
	for (i = 0; i < TAPIO_NET_PROGRAMS; i++) {
		struct tapio_net_program *entry = &net->programs[i];

		if (entry->excluded || !entry->prog)
			continue;
		entry->link = bpf_program__attach(entry->prog);
		if (!entry->link) {
			snprintf(entry->error, sizeof(entry->error), "attach: %s", strerror(errno));
			continue;
		}
		attached++;
	}
	if (attached == 0) {
		const char *why = "every kind is disabled";

		for (i = 0; i < TAPIO_NET_PROGRAMS; i++) {
			if (net->programs[i].error[0] && strcmp(net->programs[i].error, "disabled by configuration")) {
				why = net->programs[i].error;
				break;
			}
		}
		if (err && err_len)
			snprintf(err, err_len, "no BPF program attached (%s)", why);
		goto fail;
	}
	/* The ring is read through a tapio_rings (tapio_net_events_fd()). */
	net->interval_ns = cfg->interval_ns ? cfg->interval_ns : TAPIO_NET_DEFAULT_INTERVAL_NS;
	net->interval_start_ns = tapio_net_now();
	net->next_harvest_ns = net->interval_start_ns + net->interval_ns;
	return net;

fail:
	tapio_net_close(net);
	return NULL;
}

int tapio_net_program_count(const tapio_net *net)
{
	return net ? (int)TAPIO_NET_PROGRAMS : 0;
}

static bool tapio_net_index_ok(const tapio_net *net, int index)
{
	return net && index >= 0 && (size_t)index < TAPIO_NET_PROGRAMS;
}

const char *tapio_net_program_name(const tapio_net *net, int index)
{
	return tapio_net_index_ok(net, index) ? tapio_net_programs[index].program : NULL;
}

const char *tapio_net_program_capability(const tapio_net *net, int index)
{
	return tapio_net_index_ok(net, index) ? tapio_net_programs[index].capability : NULL;
}

int tapio_net_program_attached(const tapio_net *net, int index)
{
	return tapio_net_index_ok(net, index) && net->programs[index].link ? 1 : 0;
}

const char *tapio_net_program_error(const tapio_net *net, int index)
{
	return tapio_net_index_ok(net, index) ? net->programs[index].error : NULL;
}

int tapio_net_allow_netns(tapio_net *net, uint32_t inum)
{
	uint8_t one = 1;

	if (!net)
		return -EINVAL;
	return bpf_map_update_elem(bpf_map__fd(net->skel->maps.netns_allowed), &inum, &one, BPF_ANY) ? -errno : 0;
}

int tapio_net_forget_netns(tapio_net *net, uint32_t inum)
{
	if (!net)
		return -EINVAL;
	if (bpf_map_delete_elem(bpf_map__fd(net->skel->maps.netns_allowed), &inum) && errno != ENOENT)
		return -errno;
	return 0;
}

/* ---- Harvest ---- */

struct tapio_net_harvest_ctx {
	tapio_net *net;
	tapio_bpf_event_fn event_fn;
	tapio_aggregate_fn aggregate_fn;
	void *ctx;
	uint64_t start_ns;
	uint64_t end_ns;
	int delivered;
};

typedef void (*tapio_net_deliver_fn)(struct tapio_net_harvest_ctx *h, const void *key, const void *value);

static uint32_t tapio_net_clamp32(uint64_t v)
{
	return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

static void tapio_net_deliver_connect(struct tapio_net_harvest_ctx *h, const void *k, const void *v)
{
	const struct tapio_net_connect_key *key = k;
	const struct tapio_net_connect_value *value = v;
	struct tapio_event event;

	if (!h->event_fn || value->count == 0)
		return;
	memset(&event, 0, sizeof(event));
	event.kind = TAPIO_KIND_TCP_CONNECT;
	event.pid = value->pid;
	event.tid = value->tid;
	event.uid = value->uid;
	event.ts_ns = value->first_ts_ns;
	event.cgroup_id = key->cgroup_id;
	memcpy(event.comm, value->comm, sizeof(event.comm));
	event.u.tcp.op = TAPIO_TCP_CONNECT;
	event.u.tcp.family = key->family;
	event.u.tcp.sport = value->sport;
	event.u.tcp.dport = key->dport;
	event.u.tcp.outcome = key->outcome;
	memcpy(event.u.tcp.daddr, key->daddr, sizeof(event.u.tcp.daddr));
	event.u.tcp.latency_ns = value->first_latency_ns;
	event.u.tcp.error = value->error;
	event.u.tcp.netns = key->netns;
	event.u.tcp.count = tapio_net_clamp32(value->count);
	h->event_fn(h->ctx, &event);
	h->delivered++;
}

static void tapio_net_deliver_reset(struct tapio_net_harvest_ctx *h, const void *k, const void *v)
{
	const struct tapio_net_flow_key *key = k;
	const struct tapio_net_count_value *value = v;
	struct tapio_event event;

	if (!h->event_fn || value->count == 0)
		return;
	memset(&event, 0, sizeof(event));
	event.kind = TAPIO_KIND_TCP_RESET;
	event.ts_ns = value->first_ts_ns;
	event.cgroup_id = key->cgroup_id;
	event.u.tcp.op = TAPIO_TCP_RESET;
	event.u.tcp.family = key->family;
	event.u.tcp.sport = key->sport;
	event.u.tcp.dport = key->dport;
	memcpy(event.u.tcp.saddr, key->saddr, sizeof(event.u.tcp.saddr));
	memcpy(event.u.tcp.daddr, key->daddr, sizeof(event.u.tcp.daddr));
	event.u.tcp.netns = key->netns;
	event.u.tcp.count = tapio_net_clamp32(value->count);
	event.u.tcp.state = (uint8_t)value->state;
	event.u.tcp.direction = key->tag;
	h->event_fn(h->ctx, &event);
	h->delivered++;
}

static void tapio_net_agg_from_flow(struct tapio_net_harvest_ctx *h, struct tapio_aggregate *agg,
				    uint32_t kind, const struct tapio_net_flow_key *key)
{
	memset(agg, 0, sizeof(*agg));
	agg->kind = kind;
	agg->netns = key->netns;
	agg->cgroup_id = key->cgroup_id;
	agg->interval_start_ns = h->start_ns;
	agg->interval_end_ns = h->end_ns;
	agg->family = key->family;
	agg->sport = key->sport;
	agg->dport = key->dport;
	agg->protocol = 6; /* IPPROTO_TCP */
	memcpy(agg->saddr, key->saddr, sizeof(agg->saddr));
	memcpy(agg->daddr, key->daddr, sizeof(agg->daddr));
}

static void tapio_net_deliver_retransmit(struct tapio_net_harvest_ctx *h, const void *k, const void *v)
{
	const struct tapio_net_count_value *value = v;
	struct tapio_aggregate agg;

	if (!h->aggregate_fn || value->count == 0)
		return;
	tapio_net_agg_from_flow(h, &agg, TAPIO_KIND_TCP_RETRANSMIT, k);
	agg.first_ts_ns = value->first_ts_ns;
	agg.count = value->count;
	agg.state = value->state;
	h->aggregate_fn(h->ctx, &agg);
	h->delivered++;
}

static void tapio_net_deliver_latency(struct tapio_net_harvest_ctx *h, const void *k, const void *v)
{
	const struct tapio_net_flow_key *key = k;
	const struct tapio_net_latency_value *value = v;
	struct tapio_aggregate agg;

	if (!h->aggregate_fn || value->responses == 0)
		return;
	tapio_net_agg_from_flow(h, &agg, TAPIO_KIND_TCP_LATENCY, key);
	agg.role = key->tag;
	agg.first_ts_ns = value->first_ts_ns;
	agg.count = value->responses;
	agg.responses = value->responses;
	agg.response_ns_total = value->response_ns_total;
	agg.response_ns_max = value->response_ns_max;
	agg.srtt_us = value->srtt_samples ? value->srtt_us_total / value->srtt_samples : 0;
	h->aggregate_fn(h->ctx, &agg);
	h->delivered++;
}

static void tapio_net_deliver_drop(struct tapio_net_harvest_ctx *h, const void *k, const void *v)
{
	const struct tapio_net_drop_key *key = k;
	const struct tapio_net_count_value *value = v;
	struct tapio_aggregate agg;
	tapio_net *net = h->net;

	if (!h->aggregate_fn || value->count == 0)
		return;
	memset(&agg, 0, sizeof(agg));
	agg.kind = TAPIO_KIND_PACKET_DROP;
	agg.netns = key->netns;
	agg.cgroup_id = key->cgroup_id;
	agg.first_ts_ns = value->first_ts_ns;
	agg.interval_start_ns = h->start_ns;
	agg.interval_end_ns = h->end_ns;
	agg.family = key->family;
	agg.sport = key->sport;
	agg.dport = key->dport;
	agg.protocol = key->protocol;
	memcpy(agg.saddr, key->saddr, sizeof(agg.saddr));
	memcpy(agg.daddr, key->daddr, sizeof(agg.daddr));
	agg.count = value->count;
	agg.drop_reason = key->reason;
	if (key->reason < net->reason_count && net->reason_names[key->reason])
		snprintf(agg.drop_reason_name, sizeof(agg.drop_reason_name), "%s", net->reason_names[key->reason]);
	else
		snprintf(agg.drop_reason_name, sizeof(agg.drop_reason_name), "UNKNOWN_%u", key->reason);
	h->aggregate_fn(h->ctx, &agg);
	h->delivered++;
}

/* Moves every entry of one map out (batched where the kernel can, else one
 * key at a time) and delivers it. Every entry removed is delivered. */
static int tapio_net_drain(struct tapio_net_harvest_ctx *h, struct bpf_map *map, tapio_net_deliver_fn deliver)
{
	tapio_net *net = h->net;
	int fd = bpf_map__fd(map);
	size_t ksz = bpf_map__key_size(map), vsz = bpf_map__value_size(map);
	uint64_t in_batch = 0, out_batch = 0;
	bool first = true;
	int rc;

	for (;;) {
		uint32_t count = TAPIO_NET_BATCH, i;

		rc = bpf_map_lookup_and_delete_batch(fd, first ? NULL : &in_batch, &out_batch, net->keys, net->values,
						     &count, NULL);
		if (rc && rc != -ENOENT) {
			if (first && (rc == -EINVAL || rc == -ENOTSUP || rc == -EOPNOTSUPP))
				break; /* no batch ops: per key below */
			return rc;
		}
		for (i = 0; i < count; i++)
			deliver(h, (char *)net->keys + i * ksz, (char *)net->values + i * vsz);
		if (rc == -ENOENT)
			return 0;
		in_batch = out_batch;
		first = false;
	}
	/* A deleted key restarts get_next_key at the first key, which is what
	 * we want: take the first key until the map is empty. */
	for (;;) {
		if (bpf_map_get_next_key(fd, NULL, net->keys))
			return errno == ENOENT ? 0 : -errno;
		if (bpf_map_lookup_and_delete_elem(fd, net->keys, net->values)) {
			if (errno == ENOENT)
				continue;
			/* No lookup-and-delete for this map type: two steps. */
			if (bpf_map_lookup_elem(fd, net->keys, net->values))
				continue;
			bpf_map_delete_elem(fd, net->keys);
		}
		deliver(h, net->keys, net->values);
	}
}

/* Drains every map of one generation. 0 or the first error. */
static int tapio_net_drain_gen(struct tapio_net_harvest_ctx *h, uint32_t gen)
{
	struct tapio_net *skel = h->net->skel;
	const struct {
		struct bpf_map *map[2];
		tapio_net_deliver_fn deliver;
	} maps[] = {
		{ { skel->maps.connect_agg0, skel->maps.connect_agg1 }, tapio_net_deliver_connect },
		{ { skel->maps.reset_agg0, skel->maps.reset_agg1 }, tapio_net_deliver_reset },
		{ { skel->maps.retransmit_agg0, skel->maps.retransmit_agg1 }, tapio_net_deliver_retransmit },
		{ { skel->maps.latency_agg0, skel->maps.latency_agg1 }, tapio_net_deliver_latency },
		{ { skel->maps.drop_agg0, skel->maps.drop_agg1 }, tapio_net_deliver_drop },
	};
	size_t i;
	int rc, first_error = 0;

	for (i = 0; i < sizeof(maps) / sizeof(maps[0]); i++) {
		rc = tapio_net_drain(h, maps[i].map[gen & 1], maps[i].deliver);
		if (rc && !first_error)
			first_error = rc;
	}
	return first_error;
}

/* Double buffering: the programs add to the active generation of each map;
 * a harvest makes the other one active, waits until no program is still
 * adding to the one it retired, then empties that one, which nothing writes
 * any more. An event is thus in exactly one harvest: none is added to an
 * entry after user space has copied it. */
int tapio_net_harvest(tapio_net *net, tapio_bpf_event_fn event_fn, tapio_aggregate_fn aggregate_fn, void *ctx)
{
	struct tapio_net_harvest_ctx h = {
		.net = net,
		.event_fn = event_fn,
		.aggregate_fn = aggregate_fn,
		.ctx = ctx,
	};
	uint32_t retired;
	int rc, first_error = 0;

	if (!net)
		return -EINVAL;
	h.start_ns = net->interval_start_ns;
	h.end_ns = tapio_net_now();

	/* The inactive generation must be empty before it becomes active
	 * again: finish what an earlier harvest could not. */
	if (net->retired_pending) {
		if (!tapio_wait_retired(&net->skel->bss->agg_busy[(net->gen ^ 1) & 1], TAPIO_NET_RETIRE_WAIT_NS))
			return -EBUSY;
		rc = tapio_net_drain_gen(&h, net->gen ^ 1);
		if (rc)
			return rc;
		net->retired_pending = false;
	}

	net->interval_start_ns = h.end_ns;
	retired = net->gen;
	net->gen ^= 1;
	__atomic_store_n(&net->skel->bss->agg_gen, net->gen, __ATOMIC_SEQ_CST);
	if (!tapio_wait_retired(&net->skel->bss->agg_busy[(retired) & 1], TAPIO_NET_RETIRE_WAIT_NS)) {
		net->retired_pending = true;
		return h.delivered;
	}
	rc = tapio_net_drain_gen(&h, retired);
	if (rc) {
		net->retired_pending = true;
		first_error = rc;
	}
	return first_error ? first_error : h.delivered;
}

int tapio_net_harvest_due(tapio_net *net, tapio_bpf_event_fn event_fn, tapio_aggregate_fn aggregate_fn, void *ctx)
{
	uint64_t now;

	if (!net || !event_fn)
		return -EINVAL;
	now = tapio_net_now();
	if (now < net->next_harvest_ns)
		return 0;
	net->next_harvest_ns += net->interval_ns;
	if (net->next_harvest_ns <= now)
		net->next_harvest_ns = now + net->interval_ns;
	return tapio_net_harvest(net, event_fn, aggregate_fn, ctx);
}

int tapio_net_events_fd(const tapio_net *net)
{
	return net && net->skel ? bpf_map__fd(net->skel->maps.events) : -EINVAL;
}

uint32_t tapio_net_ringbuf_bytes(const tapio_net *net)
{
	return net ? net->ringbuf_bytes : 0;
}

int tapio_net_read_drops(tapio_net *net, uint64_t *out, size_t slots)
{
	if (!net || !out)
		return -EINVAL;
	memset(out, 0, slots * sizeof(*out));
	return tapio_sum_percpu(bpf_map__fd(net->skel->maps.drops), out, slots < TAPIO_NET_DROP_SLOTS ? slots : TAPIO_NET_DROP_SLOTS);
}

void tapio_net_close(tapio_net *net)
{
	size_t i;
	uint32_t r;

	if (!net)
		return;
	for (i = 0; i < TAPIO_NET_PROGRAMS; i++)
		bpf_link__destroy(net->programs[i].link);
	tapio_net__destroy(net->skel);
	for (r = 0; r < net->reason_count; r++)
		free(net->reason_names[r]);
	free(net->reason_names);
	free(net->keys);
	free(net->values);
	free(net);
}
