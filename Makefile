# Tapio: `make demo`, `make test`, `make build`. Every target first installs
# the Debian packages it needs when they are missing, so a fresh machine of
# this kind (Debian 12, root, BTF kernel) needs nothing done by hand.

SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)

SWIFT ?= swift
BPF_CLANG ?= $(firstword $(wildcard /opt/swift/usr/bin/clang) clang)
BPFTOOL ?= $(firstword $(wildcard /usr/sbin/bpftool) bpftool)
PROTOC_C ?= protoc-c

# Build: C libraries and tools the C shims, the BPF build and the proto check use.
BUILD_PACKAGES := libbpf-dev libelf-dev zlib1g-dev libprotobuf-c-dev protobuf-c-compiler \
	libssl-dev libsqlite3-dev libzstd-dev bpftool pkg-config openssl
# Tests: the independent protobuf implementation for the interop test
# (Debian's python3 + python3-protobuf, with protoc to generate its module),
# iproute2/util-linux for namespaces and mounts, promtool (prometheus) to check
# the /metrics both programs serve, Alertmanager for the alerting test,
# Chromium (headless) for the web UI test, nats-server (JetStream; single
# server and 3-node cluster) for the NATS client's tests, clickhouse-server
# (18.16; its libraries come with it) for the ClickHouse event store's tests,
# which start it on their own ports: the system service the package sets up
# is stopped and disabled right after it is installed (docs/clickhouse.md).
TEST_PACKAGES := python3 python3-protobuf python3-yaml protobuf-compiler iproute2 util-linux procps dnsmasq-base prometheus \
	prometheus-alertmanager chromium nats-server clickhouse-server
# Lab: the real services and tools the fault lab runs and injects faults with.
LAB_PACKAGES := redis-server nginx-light dnsmasq-base iptables iproute2 util-linux coreutils
# Images (`make images` only): buildah builds them from deploy/docker/Dockerfile
# without a daemon; podman with runc runs them in the smoke test, whose
# manifest reading needs python3-yaml.
IMAGE_PACKAGES := buildah podman runc python3-yaml

include bpf/build.mk
include bench/build.mk

.PHONY: all deps build debug test demo lab bench proto proto-check clean

all: build

deps:
	@missing=""; for p in $(BUILD_PACKAGES) $(TEST_PACKAGES) $(LAB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		case " $$missing " in *" clickhouse-server "*) $(clickhouse-service-off);; esac; \
	fi

# Debian's clickhouse-server package enables (and, where services may start,
# starts) a system service on ports 8123 and 9000; nothing here uses it.
clickhouse-service-off = \
	if [ -d /run/systemd/system ]; then systemctl disable --now clickhouse-server >/dev/null 2>&1 || true; \
	else service clickhouse-server stop >/dev/null 2>&1 || true; \
		rm -f /etc/systemd/system/multi-user.target.wants/clickhouse-server.service; fi; \
	update-rc.d clickhouse-server disable >/dev/null 2>&1 || true

# Release build of the four programs.
build: deps bpf
	$(SWIFT) build -c release --product tapio
	$(SWIFT) build -c release --product tapio-agent
	$(SWIFT) build -c release --product tapio-server
	$(SWIFT) build -c release --product tapio-lab
	@echo "binaries in $$($(SWIFT) build -c release --show-bin-path)"

# $(call apt-install,PACKAGES): installs those of PACKAGES that are missing.
define apt-install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

# What building needs and nothing else (deploy/docker/Dockerfile's build stage).
build-deps:
	$(call apt-install,$(BUILD_PACKAGES))

# Container images (docs/operations.md, "Container images"). `make static`:
# release builds of the three programs with the Swift runtime and Foundation
# linked in (--static-swift-stdlib), in their own scratch path so the normal
# release build stays valid; they link only system C libraries. `make images`:
# the three OCI images from them with buildah, no daemon or registry
# (deploy/scripts/images.sh), then the smoke test that starts them
# (deploy/scripts/images-test.sh). Tagged with the version in
# Sources/TapioWire/Version.swift (`make version`).
TAPIO_VERSION := $(shell sed -n 's/^ *public static let current = "\(.*\)"$$/\1/p' Sources/TapioWire/Version.swift 2>/dev/null)
STATIC_SCRATCH := .build-static
STATIC_PRODUCTS := tapio tapio-agent tapio-server
IMAGES_OUT := .build-images
.PHONY: build-deps image-deps static images version

version:
	@echo $(TAPIO_VERSION)

static: build-deps bpf
	@for p in $(STATIC_PRODUCTS); do \
		echo "$(SWIFT) build -c release --static-swift-stdlib --scratch-path $(STATIC_SCRATCH) --product $$p"; \
		$(SWIFT) build -c release --static-swift-stdlib --scratch-path $(STATIC_SCRATCH) --product $$p || exit 1; \
	done
	@echo "static binaries in $(STATIC_SCRATCH)/release"

image-deps:
	$(call apt-install,$(IMAGE_PACKAGES))

images: static image-deps
	deploy/scripts/images.sh $(STATIC_SCRATCH)/release $(IMAGES_OUT) $(TAPIO_VERSION)
	deploy/scripts/images-test.sh $(IMAGES_OUT) $(TAPIO_VERSION)

# Offline checks of deploy/ (deploy/scripts/validate.sh), part of `make
# test`: YAML, kustomize (kubectl's, where installed), the one-command
# install rendered and checked, Kubernetes schemas (kubernetes-validate, from
# PyPI) and shellcheck. No cluster.
.PHONY: deploy-check
deploy-check:
	$(call apt-install,shellcheck python3-yaml)
	@command -v kubernetes-validate >/dev/null || python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate \
		|| echo "deploy-check: kubernetes-validate could not be installed; the schema check is skipped"
	PYTHON=/usr/bin/python3 deploy/scripts/validate.sh

debug: deps bpf
	$(SWIFT) build

# Every test: Swift unit and integration tests (which need root and a BPF
# kernel; with TAPIO_REQUIRE_BPF=1 they fail instead of skipping), the
# check that the committed protobuf-c code is what the .proto generates, a
# short run of every fuzz target (fuzz-short), and the offline checks of
# deploy/ (deploy-check).
test: deps bpf proto-check fuzz-short deploy-check
	$(SWIFT) build
	$(SWIFT) test --disable-swift-testing

# Fuzzing (Fuzz/README.md). fuzz-short, part of `make test`: builds the
# libFuzzer targets, replays every committed input and fuzzes each target
# FUZZ_SHORT_SECONDS; any crash fails it. `make fuzz`: FUZZ_SECONDS in all,
# split across the targets.
FUZZ_SECONDS ?= 600
FUZZ_SHORT_SECONDS ?= 12
.PHONY: fuzz fuzz-short
fuzz: deps
	Fuzz/run.sh --total $(FUZZ_SECONDS)

fuzz-short: deps
	Fuzz/run.sh --seconds $(FUZZ_SHORT_SECONDS)

# The fault lab's OOM-kill scenario: three nodes, real services, a memory
# limit that kills Redis, and the root-cause timeline the server reports.
demo: deps bpf
	$(SWIFT) build
	scripts/demo.sh "$$($(SWIFT) build --show-bin-path)"

# Every scenario of lab/scenarios against a local server and agents; runs
# recorded in lab-runs/. LAB_RUNS=3 repeats each.
lab: deps bpf
	$(SWIFT) build
	"$$($(SWIFT) build --show-bin-path)/tapio-lab" bench --runs $${LAB_RUNS:-1}

# The agent under storms, release build (docs/performance.md): connects the
# kernel folds, a per-event storm beside the bare ring-buffer consumer, DNS
# and exec, server ingest. BENCH=connect,events,dns,exec,ingest picks sections
# (default: all).
bench: build bench-tools
	scripts/bench.sh "$$($(SWIFT) build -c release --show-bin-path)" $${BENCH_CLIENTS:-4} $${BENCH_SECONDS:-10}

# Regenerate the committed protobuf-c code from proto/tapio.proto.
proto:
	cd proto && $(PROTOC_C) --c_out=../Sources/CTapioProto tapio.proto
	mv Sources/CTapioProto/tapio.pb-c.h Sources/CTapioProto/include/tapio.pb-c.h

# Fails when the committed generated code differs from a fresh generation.
proto-check: deps
	@tmp=$$(mktemp -d); \
	(cd proto && $(PROTOC_C) --c_out=$$tmp tapio.proto) && \
	diff -u Sources/CTapioProto/tapio.pb-c.c $$tmp/tapio.pb-c.c && \
	diff -u Sources/CTapioProto/include/tapio.pb-c.h $$tmp/tapio.pb-c.h && \
	echo "proto-check: generated code matches proto/tapio.proto"; \
	rc=$$?; rm -rf $$tmp; exit $$rc

clean: bpf-clean
	rm -rf .build
