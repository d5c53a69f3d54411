import Foundation
import TapioQueryAPI
import TapioWire
import XCTest

/// Every answer type survives encode → decode unchanged, keeps the field
/// names docs/protocol.md documents, and refuses a document of the wrong shape
/// with the field named.
final class RoundTripTests: XCTestCase {
    func roundTrip<T: Codable & Equatable>(_ value: T, file: StaticString = #filePath, line: UInt = #line) throws -> JSONValue {
        let bytes = try QueryCoding.encode(value)
        XCTAssertEqual(try QueryCoding.decode(T.self, from: bytes), value, file: file, line: line)
        return try JSONValue.parse(bytes)
    }

    static let incident = QueryIncident(
        id: "inc-1", status: "open", title: "oom_kill at redis: connect_refused at api",
        openedAt: "2026-12-07T05:41:02.118330000Z", updatedAt: "2026-12-07T05:41:05Z", resolvedAt: nil, detectedAt: "2026-12-07T05:41:01Z",
        affected: .init(nodes: ["node-a"], pods: ["api-1"], services: ["api"]),
        symptoms: [.init(entity: "api", kind: "connect_refused", peer: "redis", since: "2026-12-07T05:41:01Z", last: "2026-12-07T05:41:02Z",
                         count: 120, baseline: 0.25, baselineUnit: "per_second", active: true)],
        rootCauses: [.init(entity: "redis", kind: "oom_kill", confidence: 0.87, factors: [.init(name: "time_proximity", value: 0.9, weight: 2.5)],
                           firstSeen: "2026-12-07T05:41:00Z", evidence: ["05:41:00 node-b oom_kill redis-server"], nodes: ["node-b"], inferred: false)],
        mergedIds: ["inc-0"], pages: true,
        timeline: [.init(id: "e1", time: "2026-12-07T05:41:00Z", timeNs: 1_796_000_000_000_000_000, timeErrorNs: 150_000, node: "node-b",
                         kind: "oom_kill", entity: "redis", summary: "redis-server killed", role: "cause", concurrentWith: ["e2"])],
        links: [.init(cause: .init(entity: "redis", kind: "oom_kill"), symptom: .init(entity: "api", kind: "connect_refused", peer: "redis"),
                      relation: "direct", confidence: 0.87, factors: [.init(name: "topology_match", value: 1, weight: 3)])],
        weights: ["bias": -2, "time_proximity": 2.5], model: "confidence = 1 / (1 + exp(-(bias + sum(weight * value))))")

    func testAnIncidentKeepsItsFieldsAndSaysNullWhileOpen() throws {
        let doc = try roundTrip(Self.incident)
        XCTAssertEqual(doc["resolved_at"], .null, "an open incident says resolved_at: null")
        XCTAssertEqual(doc["root_causes"]?.arrayValue?.first?["first_seen"], .string("2026-12-07T05:41:00Z"))
        XCTAssertEqual(doc["symptoms"]?.arrayValue?.first?["baseline_unit"], .string("per_second"))
        XCTAssertEqual(doc["timeline"]?.arrayValue?.first?["concurrent_with"], .array([.string("e2")]))
        XCTAssertEqual(doc["links"]?.arrayValue?.first?["symptom"]?["peer"], .string("redis"))
        XCTAssertEqual(doc["merged_ids"], .array([.string("inc-0")]))
        let listed = try roundTrip(Self.incident.summary)
        for key in ["timeline", "links", "weights", "model"] { XCTAssertNil(listed[key], "the list leaves out \(key)") }
        var resolved = Self.incident
        resolved.resolvedAt = "2026-12-07T05:50:00Z"
        XCTAssertEqual(try roundTrip(resolved)["resolved_at"], .string("2026-12-07T05:50:00Z"))
    }

    func testAnIncidentAnOlderServerStoredReadsWithDefaults() throws {
        let old = #"{"id":"inc-old","status":"resolved","title":"t","opened_at":"2026-12-01T00:00:00Z","root_causes":[{"kind":"crash","entity":"redis","confidence":0.09}],"affected":{"services":["api"]}}"#
        let i = try QueryCoding.decode(QueryIncident.self, from: Array(old.utf8))
        XCTAssertEqual(i.topCause?.kind, "crash")
        XCTAssertEqual(i.affected.services, ["api"])
        XCTAssertTrue(i.pages, "an incident from before the field pages")
        XCTAssertNil(i.timeline)
    }

    func testEveryEventKindKeepsItsFlatFields() throws {
        let base: [String: JSONValue] = ["time": .string("2026-12-07T05:41:00.000000001Z"), "time_ns": .int(1_796_000_000_000_000_001),
                                         "time_error_ns": .int(-1), "agent_time": .string("2026-12-07T05:41:00Z"), "node": .string("node-a"),
                                         "pid": .int(812), "comm": .string("redis-server"), "cgroup_id": .int(-5), "pod": .string("redis-0")]
        let kinds: [(String, [String: JSONValue])] = [
            ("process_exec", ["filename": .string("/usr/bin/redis-server"), "ppid": .int(1), "uid": .int(0)]),
            ("process_exit", ["exit_code": .int(0), "signal": .int(9), "core_dumped": .bool(false)]),
            ("oom_kill", ["victim_pid": .int(812), "victim_comm": .string("redis-server"), "victim_uid": .int(999), "total_vm_kb": .int(600_000),
                          "anon_rss_kb": .int(512_000), "file_rss_kb": .int(100)]),
            ("tcp_connect", ["src_ip": .string("10.0.1.10"), "src_port": .int(0), "dst_ip": .string("10.0.2.10"), "dst_port": .int(6379),
                             "outcome": .string("refused"), "latency_ns": .int(200_000), "count": .int(6), "errno": .string("ECONNREFUSED"),
                             "dst_pod": .string("redis-0"), "dst_namespace": .string("shop"), "dst_service": .string("redis"), "dst_node": .string("node-b"),
                             "netns": .int(4_026_531_992)]),
            ("tcp_listen", ["ip": .string("0.0.0.0"), "port": .int(6379), "state": .string("closed")]),
            ("tcp_reset", ["direction": .string("sent"), "tcp_state": .int(7), "count": .int(3)]),
            ("tcp_latency", ["srtt_us": .int(80), "responses": .int(10), "response_ns_avg": .int(1000), "response_ns_max": .int(5000), "interval_ns": .int(1_000_000_000)]),
            ("packet_drop", ["reason": .string("NETFILTER_DROP"), "count": .int(4), "protocol": .string("tcp"), "ifindex": .int(3)]),
            ("dns", ["name": .string("redis.shop"), "qtype": .string("A"), "rcode": .string("NXDOMAIN"), "outcome": .string("answer"), "id": .int(7),
                     "answers": .array([.string("10.0.2.10")]), "server": .string("10.0.0.2"), "server_port": .int(53),
                     "server_pod": .string("dns-0"), "server_namespace": .string("kube-system"), "server_node": .string("node-c")]),
            ("cpu_throttle", ["periods": .int(10), "throttled_periods": .int(8), "throttled_ns": .int(400_000_000), "cgroup": .string("/a"),
                              "usage_ns": .int(900_000_000), "psi_some_avg10": .double(3.5), "psi_some_stall_ns": .int(1000), "node_cpus": .int(2),
                              "node_runnable": .int(5), "node_psi_some_avg10": .double(7.5)]),
            ("memory_pressure", ["source": .string("psi"), "usage_bytes": .int(1 << 30), "limit_bytes": .int(1 << 31), "psi_some_avg10": .double(12.5)]),
            ("io_error", ["errno": .string("ENOSPC"), "error_code": .int(28), "syscall": .string("write")]),
        ]
        for (kind, detail) in kinds {
            var fields = base.merging(detail) { $1 }
            fields["kind"] = .string(kind)
            let event = try QueryEvent(fields: fields)
            XCTAssertEqual(event.extra, [:], "\(kind): every field is known")
            XCTAssertEqual(event.fields, fields, "\(kind): the same object back")
            XCTAssertEqual(try roundTrip(event), .object(fields), kind)
            XCTAssertEqual(event.eventKind?.name, kind)
        }
        let connect = try QueryEvent(fields: base.merging(kinds[3].1) { $1 }.merging(["kind": .string("tcp_connect")]) { $1 })
        XCTAssertEqual(connect.dstPeer, QueryEvent.Peer(pod: "redis-0", namespace: "shop", service: "redis", node: "node-b"))
        XCTAssertEqual(connect.dstPort, 6379)
    }

    func testAnEventFieldThisVersionDoesNotKnowIsKept() throws {
        let doc = #"{"kind":"cpu_throttle","time":"t","time_ns":1,"time_error_ns":0,"agent_time":"t","node":"n","cpu_steal_ns":42}"#
        let event = try QueryCoding.decode(QueryEvent.self, from: Array(doc.utf8))
        XCTAssertEqual(event.extra, ["cpu_steal_ns": .int(42)])
        XCTAssertEqual(try JSONValue.parse(QueryCoding.encode(event))["cpu_steal_ns"], .int(42))
    }

    func testADocumentOfTheWrongShapeNamesTheField() throws {
        let badEvent = #"{"count":1,"events":[{"kind":"dns","time":"t","time_ns":1,"time_error_ns":0,"agent_time":"t","node":"n","pid":"twelve"}]}"#
        XCTAssertThrowsError(try QueryCoding.decode(EventsAnswer.self, from: Array(badEvent.utf8))) { error in
            XCTAssertTrue("\(error)".contains("pid must be an integer"), "\(error)")
            XCTAssertTrue("\(error)".contains("events[0]"), "\(error)")
        }
        XCTAssertThrowsError(try QueryCoding.decode(EventsAnswer.self, from: Array(#"{"count":1,"events":[{"kind":"dns"}]}"#.utf8))) { error in
            XCTAssertTrue("\(error)".contains("missing field time"), "\(error)")
        }
        XCTAssertThrowsError(try QueryCoding.decode(NodesAnswer.self, from: Array(#"{"nodes":[{"node":"a"}]}"#.utf8))) { error in
            XCTAssertTrue("\(error)".contains("missing field connected"), "\(error)")
        }
    }

    func testTheOtherAnswersKeepTheirFieldNames() throws {
        let node = QueryNode(node: "node-a", connected: true, agentVersion: "0.9", bootId: "b", capabilities: ["exec"], degraded: [],
                             firstSeen: "f", lastSeen: "l", lastSeenAgeS: 1.5, clockOffsetNs: -3, clockErrorNs: 2, clockSamples: 8,
                             eventsReceived: 10, batchesReceived: 2, duplicateBatches: 0, drops: ["oom_kill/ringbuf_full": 1], dropsTotal: 1)
        let nodes = try roundTrip(NodesAnswer(nodes: [node]))
        XCTAssertEqual(Set(nodes["nodes"]?.arrayValue?.first.flatMap { if case .object(let o) = $0 { return Array(o.keys) } else { return nil } } ?? []),
                       ["node", "connected", "agent_version", "boot_id", "capabilities", "degraded", "first_seen", "last_seen", "last_seen_age_s",
                        "clock_offset_ns", "clock_error_ns", "clock_samples", "events_received", "batches_received", "duplicate_batches", "drops", "drops_total"])
        let pod = QueryPod(uid: "u", name: "api-1", namespace: "shop", node: "node-a", ips: ["10.0.1.10"], service: "api", ownerKind: "ReplicaSet",
                           ownerName: "api-7d9f", labels: ["app": "api"], containerIds: ["c1"])
        XCTAssertEqual(try roundTrip(PodsAnswer(pods: [pod]))["pods"]?.arrayValue?.first?["owner_kind"], .string("ReplicaSet"))
        let latency = ServiceEdge.Latency(count: 3, meanMs: 0.2, p50Ms: 0.13, p99Ms: 0.26, maxMs: 0.3)
        let edge = ServiceEdge(client: "api", server: "redis", connects: 100, failures: 20, failuresByOutcome: ["refused": 20], failureRatio: 0.2,
                               ports: [6379], connectLatency: latency, responseLatency: latency, firstSeen: "f", lastSeen: "l")
        let services = try roundTrip(ServicesAnswer(services: [edge], names: ["redis.shop": "redis"]))
        XCTAssertEqual(services["services"]?.arrayValue?.first?["connect_latency"]?["p99_ms"], .double(0.26))
        XCTAssertEqual(services["services"]?.arrayValue?.first?["failures_by_outcome"], .object(["refused": .int(20)]))
        let events = try roundTrip(EventsAnswer(events: [], retention: RetentionNotice(deletedBefore: "t", deletedBeforeNs: 5, note: "gone")))
        XCTAssertEqual(events["retention"]?["deleted_before_ns"], .int(5))
        XCTAssertEqual(events["count"], .int(0))
        XCTAssertEqual(try roundTrip(IncidentsAnswer(incidents: [Self.incident.summary]))["incidents"]?.arrayValue?.count, 1)
    }

    func testSubscriptionMessagesSayWhatTheyAre() throws {
        let snapshot = try roundTrip(SubscriptionMessage(type: .snapshot, time: "t", incidents: [Self.incident.summary]))
        XCTAssertEqual(snapshot["type"], .string("snapshot"))
        XCTAssertNil(snapshot["change"])
        let change = try roundTrip(SubscriptionMessage(type: .change, time: "t", change: .resolved, incident: Self.incident.summary))
        XCTAssertEqual(change["change"], .string("resolved"))
        XCTAssertEqual(change["incident"]?["id"], .string("inc-1"))
        XCTAssertEqual(try roundTrip(SubscriptionMessage(type: .keepalive, time: "t")), .object(["type": .string("keepalive"), "time": .string("t")]))
    }
}
