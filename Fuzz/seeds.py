#!/usr/bin/python3
"""Writes the seed corpus of Fuzz/corpus/ from proto/tapio.proto, independently
of the Swift encoders: valid messages of every type and every event detail,
frames around them, spool records, HTTP responses and Kubernetes JSON.

    Fuzz/seeds.py            (needs protoc and python3-protobuf)

Seeds are small on purpose; the fuzzer grows its own corpus from them. Files
are named by content, so running this again changes nothing unless the
seeds do.
"""
import hashlib
import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "Fuzz", "corpus")


def proto_module():
    out = tempfile.mkdtemp(prefix="tapio-seeds-")
    subprocess.run(["protoc", "--proto_path", os.path.join(ROOT, "proto"), "--python_out", out, "tapio.proto"], check=True)
    sys.path.insert(0, out)
    return importlib.import_module("tapio_pb2")


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


FRAME_TYPES = {"Hello": 1, "HelloAck": 2, "EventBatch": 3, "Ack": 4, "TimeSync": 5, "Heartbeat": 6,
               "QueryRequest": 7, "QueryResponse": 8, "Error": 9, "Goodbye": 10, "Inventory": 11}
# The selector byte of Fuzz/messages/fuzz.swift, in its order.
MESSAGE_SELECTORS = ["Hello", "HelloAck", "Ack", "TimeSync", "Heartbeat", "Error", "Goodbye",
                     "QueryRequest", "QueryResponse", "Inventory"]


def frame(kind, payload):
    return b"TP" + bytes([1, FRAME_TYPES[kind], 0, 0, 0, 0]) + struct.pack(">I", len(payload)) + payload


def batches(pb):
    v4 = bytes([10, 0, 0, 7])
    v6 = bytes([0xfd, 0] + [0] * 13 + [1])
    b = pb.EventBatch(node="node-a", epoch=1733000000000, sequence=1, base_time_ns=1764255057123456789)
    b.strings.extend(["redis-server", "/usr/bin/redis-server", "containerd-abc", "redis-0", "default",
                      "NETFILTER_DROP", "redis.default.svc.cluster.local", "/kubepods/burstable", "limit", "write"])

    def ev(kind, delta, **kw):
        e = b.events.add(kind=kind, time_delta_ns=delta, pid=4242, ppid=1, uid=999, comm=1, cgroup_id=12345,
                         netns=4026531840, container_id=3, pod=4, namespace=5)
        return e
    e = ev(pb.EVENT_KIND_PROCESS_EXEC, 0); e.exec.filename = 2
    e = ev(pb.EVENT_KIND_PROCESS_EXIT, 1000); e.exit.exit_code = 137; e.exit.signal = 9; e.exit.core_dumped = True
    e = ev(pb.EVENT_KIND_OOM_KILL, 5); e.oom_kill.victim_pid = 4242; e.oom_kill.victim_comm = 1
    e.oom_kill.total_vm_kb = 1 << 20; e.oom_kill.anon_rss_kb = 900000; e.oom_kill.file_rss_kb = 12; e.oom_kill.victim_uid = 999
    e = ev(pb.EVENT_KIND_TCP_CONNECT, -3)
    e.tcp_connect.saddr = v4; e.tcp_connect.daddr = v4; e.tcp_connect.sport = 40000; e.tcp_connect.dport = 6379
    e.tcp_connect.outcome = pb.CONNECT_OUTCOME_REFUSED; e.tcp_connect.latency_ns = 150000; e.tcp_connect.error = 111; e.tcp_connect.count = 3
    e = ev(pb.EVENT_KIND_TCP_LISTEN, 7); e.tcp_listen.addr = v6; e.tcp_listen.port = 6379; e.tcp_listen.open = True
    e = ev(pb.EVENT_KIND_TCP_RESET, 7); e.tcp_reset.saddr = v6; e.tcp_reset.daddr = v6; e.tcp_reset.sport = 1
    e.tcp_reset.dport = 2; e.tcp_reset.sent = True; e.tcp_reset.state = 7; e.tcp_reset.count = 1
    e = ev(pb.EVENT_KIND_TCP_RETRANSMIT, 9); e.tcp_retransmit.saddr = v4; e.tcp_retransmit.daddr = v4
    e.tcp_retransmit.count = 4; e.tcp_retransmit.interval_ns = 1000000000
    e = ev(pb.EVENT_KIND_TCP_LATENCY, 9); e.tcp_latency.saddr = v4; e.tcp_latency.daddr = v4; e.tcp_latency.srtt_us = 250
    e.tcp_latency.responses = 10; e.tcp_latency.response_ns_total = 5000000; e.tcp_latency.response_ns_max = 900000
    e.tcp_latency.interval_ns = 1000000000
    e = ev(pb.EVENT_KIND_PACKET_DROP, 1); e.packet_drop.reason = 6; e.packet_drop.count = 2; e.packet_drop.saddr = v4
    e.packet_drop.daddr = v4; e.packet_drop.sport = 53; e.packet_drop.dport = 5353; e.packet_drop.protocol = 17
    e.packet_drop.ifindex = 2; e.packet_drop.interval_ns = 1000
    e = ev(pb.EVENT_KIND_DNS, 2); e.dns.name = 7; e.dns.qtype = 28; e.dns.rcode = 3; e.dns.latency_ns = 2000000
    e.dns.server = v4; e.dns.server_port = 53; e.dns.id = 4660; e.dns.answers.extend([v4, v6])
    e = ev(pb.EVENT_KIND_CPU_THROTTLE, 2); e.cpu_throttle.periods = 100; e.cpu_throttle.throttled_periods = 40
    e.cpu_throttle.throttled_ns = 2 ** 64 - 1; e.cpu_throttle.interval_ns = 1; e.cpu_throttle.cgroup = 8
    e = ev(pb.EVENT_KIND_MEMORY_PRESSURE, 2); e.memory_pressure.source = 9; e.memory_pressure.count = 2 ** 63
    e.memory_pressure.usage_bytes = 1 << 30; e.memory_pressure.limit_bytes = 1 << 30; e.memory_pressure.psi_some_avg10_permille = 155
    e.memory_pressure.interval_ns = 5; e.memory_pressure.cgroup = 8
    e = ev(pb.EVENT_KIND_IO_ERROR, 2); e.io_error.error = 28; e.io_error.syscall = 10; e.io_error.count = 1; e.io_error.interval_ns = 7
    ev(pb.EVENT_KIND_UNSPECIFIED, 0)
    b.drops.add(kind=pb.EVENT_KIND_TCP_CONNECT, reason="ringbuf_full", count=17)
    b.drops.add(kind=pb.EVENT_KIND_UNSPECIFIED, reason="spool_full", count=2 ** 64 - 1)
    yield b.SerializeToString()

    # Every detail alone, so each seed is small and reaches its own branch.
    for i in range(len(b.events)):
        one = pb.EventBatch(node="n", epoch=2, sequence=i + 1, base_time_ns=-(1 << 62))
        one.strings.extend(b.strings)
        one.events.add().CopyFrom(b.events[i])
        yield one.SerializeToString()
    yield pb.EventBatch().SerializeToString()
    yield pb.EventBatch(node="n", sequence=2 ** 64 - 1, epoch=2 ** 64 - 1,
                        events=[pb.Event(kind=pb.EVENT_KIND_PROCESS_EXEC, time_delta_ns=2 ** 63 - 1)] * 3).SerializeToString()


def small_messages(pb):
    yield "Hello", pb.Hello(node="node-a", agent_version="0.9.0", boot_id="0e3c1f7a-8d2b-4c47-9a61-5b0f7b2d8c11",
                            capabilities=["process_exec", "tcp_connect", "dns"], stream_epoch=1733000000000,
                            protocol_version=2, degraded=["io_error"])
    yield "HelloAck", pb.HelloAck(max_frame_bytes=4 << 20, window_batches=32, acked_sequence=17, server_version="0.9.0",
                                  max_batch_events=65536)
    yield "Ack", pb.Ack(epoch=1733000000000, sequence=2 ** 64 - 1)
    yield "TimeSync", pb.TimeSync(id=7, t1=1764255057123456789, t2=-1, t3=2 ** 63 - 1)
    yield "Heartbeat", pb.Heartbeat(time_ns=1764255057123456789)
    yield "Error", pb.Error(code=3, message="identity mismatch: certificate says node-b")
    yield "Goodbye", pb.Goodbye(reason="shutdown", last_sequence=99)
    yield "QueryRequest", pb.QueryRequest(method="events", params={"since": "10m", "kind": "oom_kill", "limit": "100"})
    yield "QueryResponse", pb.QueryResponse(status=0, error="", json=b'{"events":[{"kind":"oom_kill","pid":4242}]}')
    inv = pb.Inventory()
    p = inv.pods.add(uid="6f1c2a4e-0b8d-4c1e-9f3a-7d2e5b8c9a01", name="redis-0", namespace="default", node="node-a",
                     ips=["10.0.0.7", "fd00::7"], service="redis", owner_kind="StatefulSet", owner_name="redis",
                     container_ids=["abc123", "def456"])
    p.labels["app"] = "redis"
    p.labels["pod-template-hash"] = "7d4b9c8f6d"
    inv.pods.add(uid="u2", name="web-7d4b9c8f6d-x2x9z", namespace="shop", node="node-a")
    yield "Inventory", inv


def crc(b):
    return zlib.crc32(b) & 0xFFFFFFFF


def spool_record(epoch, sequence, events, payload):
    head = b"TPSR" + bytes([1, 0, 0, 0]) + struct.pack(">QQII", epoch, sequence, events, len(payload))
    return head + struct.pack(">II", crc(head), crc(payload)) + payload


POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-7d4b9c8f6d-x2x9z", "namespace": "shop", "uid": "6f1c2a4e-0b8d-4c1e-9f3a-7d2e5b8c9a01",
                 "resourceVersion": "1234", "labels": {"app": "web", "pod-template-hash": "7d4b9c8f6d"},
                 "annotations": {"kubernetes.io/config.hash": "abc"},
                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6d", "uid": "r1", "controller": True}]},
    "spec": {"nodeName": "node-a", "hostNetwork": False, "containers": [{"name": "web", "image": "nginx:1.27"}, {"name": "sidecar"}]},
    "status": {"phase": "Running", "hostIP": "192.168.1.10", "podIP": "10.0.0.8", "podIPs": [{"ip": "10.0.0.8"}, {"ip": "fd00::8"}],
               "qosClass": "Burstable", "startTime": "2026-11-27T14:50:57Z",
               "containerStatuses": [{"name": "web", "containerID": "containerd://0123456789abcdef", "image": "nginx:1.27",
                                      "ready": True, "started": True, "restartCount": 3,
                                      "state": {"running": {"startedAt": "2026-11-27T14:51:00Z"}},
                                      "lastState": {"terminated": {"exitCode": 137, "signal": 9, "reason": "OOMKilled",
                                                                   "containerID": "containerd://fedcba9876543210",
                                                                   "startedAt": "x", "finishedAt": "y"}}}],
               "initContainerStatuses": [{"name": "init", "containerID": "cri-o://aa", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
               "ephemeralContainerStatuses": [{"name": "debug", "containerID": "docker://bb", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "m"}}}]},
}


def kube_documents():
    pod_list = {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1240"}, "items": [POD, {"metadata": {"name": "bare", "uid": "u3"}}]}
    yield json.dumps(pod_list, separators=(",", ":"))
    yield json.dumps(POD)
    yield json.dumps({"kind": "List", "items": []})
    yield json.dumps({"kind": "Status", "status": "Failure", "message": "pods is forbidden", "reason": "Forbidden", "code": 403})


def watch_lines():
    lines = [
        {"type": "ADDED", "object": POD},
        {"type": "MODIFIED", "object": {"metadata": {"name": "web-7d4b9c8f6d-x2x9z", "uid": POD["metadata"]["uid"], "resourceVersion": "1235"}}},
        {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "1236"}}},
        {"type": "DELETED", "object": {"metadata": {"uid": POD["metadata"]["uid"], "resourceVersion": "1237"}}},
        {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}},
    ]
    return [json.dumps(l, separators=(",", ":")) for l in lines]


def http_response(body, chunked=False, status="200 OK", extra=""):
    if isinstance(body, str):
        body = body.encode()
    head = "HTTP/1.1 " + status + "\r\nContent-Type: application/json\r\n" + extra
    if chunked:
        out = b""
        step = 37
        for i in range(0, len(body), step):
            piece = body[i:i + step]
            out += b"%x" % len(piece) + (b";ext=1" if i == 0 else b"") + b"\r\n" + piece + b"\r\n"
        out += b"0\r\nX-Trailer: y\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + out
    return (head + "Content-Length: %d\r\n\r\n" % len(body)).encode() + body


def main():
    pb = proto_module()
    all_batches = list(batches(pb))
    for payload in all_batches:
        write("event_batch", payload)
    for name, message in small_messages(pb):
        payload = message.SerializeToString()
        write("messages", bytes([MESSAGE_SELECTORS.index(name)]) + payload)
        write("frame", bytes([0x04]) + frame(name, payload))
    write("frame", bytes([0x14]) + frame("Heartbeat", b"") + frame("EventBatch", all_batches[3]) + frame("Ack", b"\x08\x01\x10\x02"))

    # spool_record: byte 0 bit 0 asks the target to set the checksums itself.
    for fix in (0, 1):
        write("spool_record", bytes([fix]) + spool_record(1733000000000, 1, 13, all_batches[0]))
        write("spool_record", bytes([fix]) + spool_record(2, 7, 1, all_batches[4]))
        write("spool_record", bytes([fix]) + spool_record(0, 0, 0, b""))

    for doc in kube_documents():
        write("kube_json", doc)
    for line in watch_lines():
        write("kube_json", line)

    write("json_value", '{"a":[1,-2,3.5,1e300,true,false,null,"x\\n\\u0001\\ud83d\\ude00"],"b":{"c":{}},"d":[]}')
    write("json_value", json.dumps({"kind": "oom_kill", "pid": 4242, "time": "2026-11-27T14:50:57.123456789Z",
                                    "detail": {"victim_pid": 4242, "total_vm_kb": 9223372036854775807, "psi_some_avg10": 15.5}}))
    write("json_value", "[18446744073709551615,-9223372036854775808,0.1,-0.0]")

    # http_response: selector byte (see Fuzz/http_response/fuzz.swift), then the bytes the server sent.
    pod_list = next(kube_documents())
    watch = "\n".join(watch_lines()[:4]) + "\n"
    write("http_response", bytes([0x00]) + http_response(pod_list))
    write("http_response", bytes([0x11]) + http_response(pod_list, chunked=True))
    write("http_response", bytes([0x02]) + http_response(watch, chunked=True))
    write("http_response", bytes([0x22]) + http_response("\n".join(watch_lines()) + "\n", chunked=True))
    write("http_response", bytes([0x03]) + http_response(watch))
    write("http_response", bytes([0x01]) + b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n" + watch.encode())
    write("http_response", bytes([0x00]) + http_response('{"kind":"Status","code":410,"message":"gone"}', status="410 Gone"))
    write("http_response", bytes([0x04]) + b"7\r\n{\"a\":1}\r\n3;ext=1\r\n\n{\"\r\n6\r\nb\":2}\n\r\n0\r\nX-Trailer: y\r\n\r\n")


if __name__ == "__main__":
    main()
