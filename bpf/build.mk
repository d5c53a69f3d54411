# Kernel programs: bpf/<name>.bpf.c -> bpf/.output/<name>.bpf.o -> a libbpf
# skeleton Sources/CTapioBPF/generated/<name>.skel.h (struct tapio_<name>).
#
# Included by the top-level Makefile; paths are relative to the repository
# root, where make runs. To add a program, create bpf/<name>.bpf.c and append
# <name> to BPF_PROGRAMS.

BPF_PROGRAMS := process dns io net

BPF_CLANG ?= clang
BPFTOOL ?= bpftool
# Kernel BTF that vmlinux.h is generated from. CO-RE relocates field offsets
# at load time, so the header need not match the kernel the agent runs on.
BPF_VMLINUX_BTF ?= /sys/kernel/btf/vmlinux
BPF_ARCH ?= $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/' \
	-e 's/ppc64le/powerpc/' -e 's/riscv64/riscv/' -e 's/s390x/s390/')
BPF_CFLAGS ?= -g -O2 -Wall -Werror

BPF_OUTPUT := bpf/.output
BPF_SKEL_DIR := Sources/CTapioBPF/generated
BPF_OBJECTS := $(patsubst %,$(BPF_OUTPUT)/%.bpf.o,$(BPF_PROGRAMS))
BPF_SKELETONS := $(patsubst %,$(BPF_SKEL_DIR)/%.skel.h,$(BPF_PROGRAMS))
BPF_HEADERS := $(wildcard bpf/*.h) $(wildcard Sources/CTapioBPF/include/*.h)

.PHONY: bpf bpf-clean

bpf: $(BPF_OBJECTS) $(BPF_SKELETONS)

# Keep the objects: the tests and bpftool inspect them, not only the skeletons.
.SECONDARY: $(BPF_OBJECTS)

$(BPF_OUTPUT) $(BPF_SKEL_DIR):
	mkdir -p $@

$(BPF_OUTPUT)/vmlinux.h: | $(BPF_OUTPUT)
	$(BPFTOOL) btf dump file $(BPF_VMLINUX_BTF) format c > $@.tmp
	mv $@.tmp $@

# -g emits BTF and BTF.ext (CO-RE relocations). Passing the object through
# bpftool's static linker keeps those and drops the DWARF, which would
# otherwise make the skeleton's embedded copy of the object ~15x larger.
$(BPF_OUTPUT)/%.bpf.o: bpf/%.bpf.c $(BPF_HEADERS) $(BPF_OUTPUT)/vmlinux.h | $(BPF_OUTPUT)
	$(BPF_CLANG) $(BPF_CFLAGS) -target bpf -D__TARGET_ARCH_$(BPF_ARCH) \
		-I Sources/CTapioBPF/include -I $(BPF_OUTPUT) -I bpf \
		-c $< -o $(@:.bpf.o=.tmp.bpf.o)
	$(BPFTOOL) gen object $@ $(@:.bpf.o=.tmp.bpf.o)
	rm -f $(@:.bpf.o=.tmp.bpf.o)

$(BPF_SKEL_DIR)/%.skel.h: $(BPF_OUTPUT)/%.bpf.o | $(BPF_SKEL_DIR)
	$(BPFTOOL) gen skeleton $< name tapio_$* > $@.tmp
	mv $@.tmp $@

bpf-clean:
	rm -rf $(BPF_OUTPUT) $(BPF_SKEL_DIR)
