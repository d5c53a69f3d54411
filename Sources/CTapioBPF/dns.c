#define _GNU_SOURCE
#include "tapio_dns.h"
#include "percpu.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "dns.skel.h"

#define TAPIO_DNS_DEFAULT_RINGBUF_BYTES (4u << 20)
/* The verifier's log when loading fails; its end holds the reason. */
#define TAPIO_DNS_KERNEL_LOG_BYTES (256u * 1024u)
#define TAPIO_DNS_DROP_SLOTS (TAPIO_KIND_MAX * TAPIO_DROP_REASON_MAX)
#define TAPIO_DNS_SCAN_MIN_NS 10000000ull    /* 10 ms */
#define TAPIO_DNS_SCAN_MAX_NS 1000000000ull  /* 1 s */

struct tapio_dns_loader {
	struct tapio_dns *skel;
	struct bpf_link *egress;
	struct bpf_link *ingress;
	uint32_t ringbuf_bytes;
	char cgroup_path[PATH_MAX];
	bool process_context;
	uint64_t timeout_ns;
	uint64_t scan_interval_ns;
	uint64_t next_scan_ns;
	uint64_t timeouts; /* TAPIO_DNS_STAT_TIMEOUTS */
	uint32_t max_pending;

	/* State of the poll in progress. */
	tapio_bpf_event_fn fn;
	void *fn_ctx;
	int delivered;
	bool stopped;
};

static uint64_t tapio_dns_now_ns(void)
{
	struct timespec ts;

	/* bpf_ktime_get_ns() is CLOCK_MONOTONIC. */
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void tapio_dns_set_error(char *err, size_t err_len, const char *kernel_log, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* The message, then as much of the end of the kernel log as fits. */
static void tapio_dns_set_error(char *err, size_t err_len, const char *kernel_log, const char *fmt, ...)
{
	size_t used, room, log_len;
	const char *tail, *line;
	va_list args;

	if (!err || err_len == 0)
		return;
	va_start(args, fmt);
	vsnprintf(err, err_len, fmt, args);
	va_end(args);
	if (!kernel_log || !kernel_log[0])
		return;
	used = strlen(err);
	if (used + 2 >= err_len)
		return;
	room = err_len - used - 2;
	log_len = strlen(kernel_log);
	tail = kernel_log;
	if (log_len > room) {
		tail = kernel_log + log_len - room;
		line = strchr(tail, '\n');
		if (line && line[1] != '\0')
			tail = line + 1;
	}
	snprintf(err + used, err_len - used, "\n%s", tail);
}

/* The cgroup2 mount point (the first one in mountinfo). */
static int tapio_dns_cgroup2_mount(char *out, size_t len)
{
	FILE *mountinfo = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int rc = -ENOENT;

	if (!mountinfo)
		return -errno;
	while (getline(&line, &cap, mountinfo) > 0) {
		char *sep = strstr(line, " - "), *save = NULL, *field;
		int n;

		if (!sep || strncmp(sep + 3, "cgroup2 ", 8) != 0)
			continue;
		*sep = '\0';
		field = strtok_r(line, " ", &save);
		for (n = 1; field && n < 5; n++)
			field = strtok_r(NULL, " ", &save);
		if (!field)
			continue;
		/* Octal escapes (\040) would need decoding; such a mount point
		 * is not one the agent would be given. */
		if (strchr(field, '\\'))
			continue;
		if (snprintf(out, len, "%s", field) >= (int)len) {
			rc = -ENAMETOOLONG;
			continue;
		}
		rc = 0;
		break;
	}
	free(line);
	fclose(mountinfo);
	return rc;
}

static bool tapio_dns_valid_ringbuf_bytes(uint32_t bytes)
{
	long page = sysconf(_SC_PAGESIZE);

	return bytes != 0 && (bytes & (bytes - 1)) == 0 && page > 0 && bytes % (uint32_t)page == 0;
}

/* Whether cgroup_skb programs may read the current task: the helpers are
 * in the base set only for CAP_PERFMON, and only on newer kernels. */
static bool tapio_dns_probe_task_helpers(void)
{
	return libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SKB, BPF_FUNC_get_current_task, NULL) > 0 &&
	       libbpf_probe_bpf_helper(BPF_PROG_TYPE_CGROUP_SKB, BPF_FUNC_probe_read_kernel, NULL) > 0;
}

tapio_dns *tapio_dns_open(const tapio_dns_config *config, char *err, size_t err_len)
{
	static const tapio_dns_config defaults;
	const tapio_dns_config *cfg = config ? config : &defaults;
	uint32_t ringbuf_bytes = cfg->ringbuf_bytes ? cfg->ringbuf_bytes : TAPIO_DNS_DEFAULT_RINGBUF_BYTES;
	uint32_t max_pending = cfg->max_pending ? cfg->max_pending : TAPIO_DNS_DEFAULT_MAX_PENDING;
	char *kernel_log = NULL;
	char mount_point[PATH_MAX];
	const char *path = cfg->cgroup_path;
	struct statfs fs;
	tapio_dns *dns;
	int cgroup_fd = -1, rc;

	if (err && err_len)
		err[0] = '\0';
	if (!tapio_dns_valid_ringbuf_bytes(ringbuf_bytes)) {
		tapio_dns_set_error(err, err_len, NULL,
				    "ring buffer size %u: not a power of two multiple of the page size", ringbuf_bytes);
		return NULL;
	}
	dns = calloc(1, sizeof(*dns));
	kernel_log = calloc(1, TAPIO_DNS_KERNEL_LOG_BYTES);
	if (!dns || !kernel_log) {
		tapio_dns_set_error(err, err_len, NULL, "%s", strerror(ENOMEM));
		goto fail;
	}
	dns->max_pending = max_pending;
	dns->timeout_ns = cfg->timeout_ns ? cfg->timeout_ns : TAPIO_DNS_DEFAULT_TIMEOUT_NS;
	dns->scan_interval_ns = dns->timeout_ns / 5;
	if (dns->scan_interval_ns < TAPIO_DNS_SCAN_MIN_NS)
		dns->scan_interval_ns = TAPIO_DNS_SCAN_MIN_NS;
	if (dns->scan_interval_ns > TAPIO_DNS_SCAN_MAX_NS)
		dns->scan_interval_ns = TAPIO_DNS_SCAN_MAX_NS;

	if (!path) {
		rc = tapio_dns_cgroup2_mount(mount_point, sizeof(mount_point));
		if (rc) {
			tapio_dns_set_error(err, err_len, NULL, "find the cgroup2 mount: %s", strerror(-rc));
			goto fail;
		}
		path = mount_point;
	}
	if (!realpath(path, dns->cgroup_path)) {
		tapio_dns_set_error(err, err_len, NULL, "cgroup %s: %s", path, strerror(errno));
		goto fail;
	}
	cgroup_fd = open(dns->cgroup_path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (cgroup_fd < 0 || fstatfs(cgroup_fd, &fs) != 0) {
		tapio_dns_set_error(err, err_len, NULL, "cgroup %s: %s", dns->cgroup_path, strerror(errno));
		goto fail;
	}
	if (fs.f_type != CGROUP2_SUPER_MAGIC) {
		tapio_dns_set_error(err, err_len, NULL, "cgroup %s: not a cgroup2 directory", dns->cgroup_path);
		goto fail;
	}

	{
		LIBBPF_OPTS(bpf_object_open_opts, opts, .kernel_log_buf = kernel_log,
			    .kernel_log_size = TAPIO_DNS_KERNEL_LOG_BYTES);

		dns->skel = tapio_dns__open_opts(&opts);
	}
	if (!dns->skel) {
		tapio_dns_set_error(err, err_len, NULL, "open BPF object: %s", strerror(errno));
		goto fail;
	}
	dns->process_context = tapio_dns_probe_task_helpers();
	dns->skel->rodata->have_current_task = dns->process_context;
	dns->skel->rodata->dns_port = cfg->port ? cfg->port : TAPIO_DNS_DEFAULT_PORT;
	dns->skel->rodata->wakeup_bytes = tapio_wakeup_mark(cfg->wakeup_bytes, ringbuf_bytes);
	dns->ringbuf_bytes = ringbuf_bytes;
	rc = bpf_map__set_max_entries(dns->skel->maps.events, ringbuf_bytes);
	if (!rc)
		rc = bpf_map__set_max_entries(dns->skel->maps.pending, max_pending);
	if (rc) {
		tapio_dns_set_error(err, err_len, NULL, "size maps: %s", strerror(-rc));
		goto fail;
	}
	rc = tapio_dns__load(dns->skel);
	if (rc) {
		/* ENOSPC: the verifier's log outgrew the buffer; the kernel
		 * keeps its end, which holds the reason. */
		tapio_dns_set_error(err, err_len, kernel_log, "load BPF programs: %s",
				    rc == -ENOSPC && kernel_log[0] ? "rejected by the verifier" : strerror(-rc));
		goto fail;
	}

	/* BPF links: multi-attach, and detached when destroyed or when the
	 * process dies, so nothing stays attached after the agent. */
	dns->egress = bpf_program__attach_cgroup(dns->skel->progs.dns_egress, cgroup_fd);
	if (!dns->egress) {
		tapio_dns_set_error(err, err_len, NULL, "attach cgroup_skb/egress to %s: %s", dns->cgroup_path,
				    strerror(errno));
		goto fail;
	}
	dns->ingress = bpf_program__attach_cgroup(dns->skel->progs.dns_ingress, cgroup_fd);
	if (!dns->ingress) {
		tapio_dns_set_error(err, err_len, NULL, "attach cgroup_skb/ingress to %s: %s", dns->cgroup_path,
				    strerror(errno));
		goto fail;
	}
	/* The ring is read through a tapio_rings (tapio_dns_events_fd()). */
	close(cgroup_fd);
	free(kernel_log);
	dns->next_scan_ns = tapio_dns_now_ns() + dns->scan_interval_ns;
	return dns;

fail:
	if (cgroup_fd >= 0)
		close(cgroup_fd);
	free(kernel_log);
	tapio_dns_close(dns);
	return NULL;
}

const char *tapio_dns_capability(void)
{
	return "dns";
}

int tapio_dns_attached(const tapio_dns *dns)
{
	return dns && dns->egress && dns->ingress ? 1 : 0;
}

const char *tapio_dns_error(const tapio_dns *dns)
{
	return dns ? "" : "not open";
}

const char *tapio_dns_cgroup_path(const tapio_dns *dns)
{
	return dns ? dns->cgroup_path : NULL;
}

int tapio_dns_has_process_context(const tapio_dns *dns)
{
	return dns && dns->process_context ? 1 : 0;
}

/* The timeout event of one pending query; ts_ns is now, when it is known
 * to have gone unanswered. */
static void tapio_dns_timeout_event(struct tapio_event *event, const struct tapio_dns_pending_key *key,
				    const struct tapio_dns_pending *q, uint64_t now)
{
	struct tapio_dns_info *info = &event->u.dns;

	memset(event, 0, sizeof(*event));
	event->kind = TAPIO_KIND_DNS;
	event->pid = q->pid;
	event->tid = q->tid;
	event->ppid = q->ppid;
	event->uid = q->uid;
	event->ts_ns = now;
	event->cgroup_id = q->cgroup_id;
	memcpy(event->comm, q->comm, sizeof(event->comm));
	info->family = key->family;
	info->server_port = q->server_port;
	info->id = key->id;
	info->qtype = q->qtype;
	info->rcode = -1;
	info->netns = q->netns;
	info->latency_ns = now - q->ts_ns;
	memcpy(info->server, q->server, sizeof(info->server));
	memcpy(info->name, q->name, sizeof(info->name));
	info->name[sizeof(info->name) - 1] = '\0';
}

/* Emits and forgets every query pending longer than the timeout. Keys are
 * collected first: deleting while walking would restart the walk. */
static int tapio_dns_scan(tapio_dns *dns)
{
	int fd = bpf_map__fd(dns->skel->maps.pending);
	struct tapio_dns_pending_key key, next, *expired = NULL;
	struct tapio_dns_pending q;
	size_t count = 0, cap = 0, i;
	uint64_t now = tapio_dns_now_ns();
	/* A key deleted under the walk restarts it from the first key: the
	 * bound keeps a busy table from holding the walk forever. */
	uint64_t steps = 2ull * dns->max_pending;
	void *prev = NULL;
	int rc = 0;

	while (steps-- > 0 && bpf_map_get_next_key(fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		if (bpf_map_lookup_elem(fd, &key, &q) != 0)
			continue;
		if (now - q.ts_ns < dns->timeout_ns || q.ts_ns > now)
			continue;
		if (count == cap) {
			size_t grown = cap ? cap * 2 : 64;
			void *bigger = realloc(expired, grown * sizeof(*expired));

			if (!bigger) {
				rc = -ENOMEM;
				break;
			}
			expired = bigger;
			cap = grown;
		}
		expired[count++] = key;
	}
	for (i = 0; i < count && !dns->stopped; i++) {
		struct tapio_event event;

		if (bpf_map_lookup_elem(fd, &expired[i], &q) != 0)
			continue; /* answered meanwhile */
		now = tapio_dns_now_ns();
		if (now - q.ts_ns < dns->timeout_ns || q.ts_ns > now)
			continue; /* a new query reused the key */
		/* The kernel may take it for a late answer at the same time:
		 * only the side whose delete succeeds emits it. */
		if (bpf_map_delete_elem(fd, &expired[i]) != 0)
			continue;
		tapio_dns_timeout_event(&event, &expired[i], &q, now);
		__atomic_add_fetch(&dns->timeouts, 1, __ATOMIC_RELAXED);
		dns->delivered++;
		if (dns->fn(dns->fn_ctx, &event) != 0)
			dns->stopped = true;
	}
	free(expired);
	return rc;
}

/* Sums a per-CPU array of u64 counters into out[0 .. filled). */
int tapio_dns_read_drops(tapio_dns *dns, uint64_t *out, size_t slots)
{
	if (!dns || !out)
		return -EINVAL;
	memset(out, 0, slots * sizeof(*out));
	return tapio_sum_percpu(bpf_map__fd(dns->skel->maps.drops), out,
				    slots < TAPIO_DNS_DROP_SLOTS ? slots : TAPIO_DNS_DROP_SLOTS);
}

int tapio_dns_read_stats(tapio_dns *dns, uint64_t *out, size_t slots)
{
	int rc;

	if (!dns || !out)
		return -EINVAL;
	memset(out, 0, slots * sizeof(*out));
	/* The kernel's array stops before the user-space counters. */
	rc = tapio_sum_percpu(bpf_map__fd(dns->skel->maps.dns_stats), out,
				  slots < TAPIO_DNS_STAT_TIMEOUTS ? slots : TAPIO_DNS_STAT_TIMEOUTS);
	if (slots > TAPIO_DNS_STAT_TIMEOUTS)
		out[TAPIO_DNS_STAT_TIMEOUTS] = __atomic_load_n(&dns->timeouts, __ATOMIC_RELAXED);
	return rc;
}

int tapio_dns_pending_count(tapio_dns *dns)
{
	struct tapio_dns_pending_key key, next;
	void *prev = NULL;
	int fd, count = 0;

	if (!dns)
		return -EINVAL;
	fd = bpf_map__fd(dns->skel->maps.pending);
	while (count < (int)dns->max_pending && bpf_map_get_next_key(fd, prev, &next) == 0) {
		key = next;
		prev = &key;
		count++;
	}
	return count;
}

int tapio_dns_scan_due(tapio_dns *dns, tapio_bpf_event_fn fn, void *ctx)
{
	uint64_t now;
	int rc;

	if (!dns || !fn)
		return -EINVAL;
	now = tapio_dns_now_ns();
	if (now < dns->next_scan_ns)
		return 0;
	dns->next_scan_ns = now + dns->scan_interval_ns;
	dns->fn = fn;
	dns->fn_ctx = ctx;
	dns->delivered = 0;
	dns->stopped = false;
	rc = tapio_dns_scan(dns);
	dns->fn = NULL;
	dns->fn_ctx = NULL;
	return rc < 0 && dns->delivered == 0 ? rc : dns->delivered;
}

int tapio_dns_events_fd(const tapio_dns *dns)
{
	return dns && dns->skel ? bpf_map__fd(dns->skel->maps.events) : -EINVAL;
}

uint32_t tapio_dns_ringbuf_bytes(const tapio_dns *dns)
{
	return dns ? dns->ringbuf_bytes : 0;
}

void tapio_dns_close(tapio_dns *dns)
{
	if (!dns)
		return;
	bpf_link__destroy(dns->ingress);
	bpf_link__destroy(dns->egress);
	tapio_dns__destroy(dns->skel);
	free(dns);
}
