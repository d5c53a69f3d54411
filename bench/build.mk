# The benchmark's small C tools (bench/*.c) -> .build-bench/, used by
# scripts/bench.sh (`make bench`). Included by the top-level Makefile.
#
# ringbuf_bare loads the agent's own process object through its skeleton, so
# it is built after `make bpf`; the storms need only libc.

BENCH_CC ?= $(BPF_CLANG)
BENCH_CFLAGS ?= -g -O2 -Wall -Werror
BENCH_OUT := .build-bench
BENCH_TOOLS := $(addprefix $(BENCH_OUT)/,ringbuf_bare storm dnsstorm execstorm exit0)

.PHONY: bench-tools
bench-tools: $(BENCH_TOOLS)

$(BENCH_OUT):
	mkdir -p $@

$(BENCH_OUT)/ringbuf_bare: bench/ringbuf_bare.c $(BPF_SKEL_DIR)/process.skel.h Sources/CTapioBPF/include/tapio_events.h | $(BENCH_OUT)
	$(BENCH_CC) $(BENCH_CFLAGS) -I Sources/CTapioBPF/include -I $(BPF_SKEL_DIR) $< -o $@ -lbpf -lelf -lz

$(BENCH_OUT)/storm $(BENCH_OUT)/dnsstorm $(BENCH_OUT)/execstorm: $(BENCH_OUT)/%: bench/%.c | $(BENCH_OUT)
	$(BENCH_CC) $(BENCH_CFLAGS) $< -o $@ -lpthread

# What execstorm executes: a static binary without libc that only exits, so
# an exec costs the kernel's exec and exit paths and nothing else.
$(BENCH_OUT)/exit0: bench/exit0.c | $(BENCH_OUT)
	$(BENCH_CC) -O2 -static -nostdlib -o $@ $<
