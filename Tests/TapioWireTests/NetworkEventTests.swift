import Foundation
import TapioWire
import XCTest

final class NetworkEventTests: XCTestCase {
    static let flow = Flow(source: IPAddress("10.0.1.5"), destination: IPAddress("10.0.2.7"), sourcePort: 41000, destinationPort: 6379)

    /// One event of every kind with every field set survives encode → decode.
    func testEveryKindRoundTrips() throws {
        let v6 = Flow(source: IPAddress("fd00::1"), destination: IPAddress("fd00::2"), sourcePort: 1, destinationPort: 2)
        let details: [(EventKind, TapioEvent.Detail)] = [
            (.tcpConnect, .tcpConnect(flow: Self.flow, outcome: .refused, latencyNs: 120_000, error: ECONNREFUSED, count: 17)),
            (.tcpConnect, .tcpConnect(flow: v6, outcome: .established, latencyNs: 1, error: 0, count: 1)),
            (.tcpListen, .tcpListen(address: IPAddress("0.0.0.0"), port: 6379, open: false)),
            (.tcpReset, .tcpReset(flow: Self.flow, sent: true, state: 1, count: 3)),
            (.tcpRetransmit, .tcpRetransmit(flow: Self.flow, count: 44, intervalNs: 1_000_000_000)),
            (.tcpLatency, .tcpLatency(flow: Self.flow, srttUs: 850, responses: 10, responseNsTotal: 5_000_000, responseNsMax: 900_000, intervalNs: 1_000_000_000)),
            (.packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: 9, flow: Self.flow, ipProtocol: 6, ifindex: 4, intervalNs: 1_000_000_000)),
            (.dns, .dns(name: "redis.lab.svc", qtype: 1, rcode: 3, latencyNs: 800_000, server: IPAddress("10.0.0.2"), serverPort: 53, id: 4711,
                        answers: [IPAddress("10.0.2.7")!, IPAddress("fd00::7")!])),
            (.dns, .dns(name: "lost.example", qtype: 28, rcode: -1, latencyNs: 5_000_000_000, server: nil, serverPort: 0, id: 1, answers: [])),
            (.cpuThrottle, .cpuThrottle(periods: 10, throttledPeriods: 9, throttledNs: 450_000_000, intervalNs: 1_000_000_000, cgroup: "/lab/node1/api")),
            (.cpuThrottle, .cpuThrottle(periods: 0, throttledPeriods: 0, throttledNs: 0, intervalNs: 1_000_000_000, cgroup: "/lab/node1",
                                        usage: CPUUsage(usageNs: 480_000_000, pressure: CPUPressure(someAvg10Permille: 353, someStallNs: 310_000_000),
                                                        node: NodeCPU(cpus: 2, runnable: 3, pressure: CPUPressure(someAvg10Permille: 120, someStallNs: 90_000_000))))),
            (.cpuThrottle, .cpuThrottle(periods: 5, throttledPeriods: 0, throttledNs: 0, intervalNs: 1_000_000_000, cgroup: "/lab/node1/hog",
                                        usage: CPUUsage(usageNs: 990_000_000))),
            (.cpuThrottle, .cpuThrottle(periods: 0, throttledPeriods: 0, throttledNs: 0, intervalNs: 1_000_000_000, cgroup: "/",
                                        usage: CPUUsage(usageNs: 0, node: NodeCPU(cpus: 64, runnable: 1)))),
            (.memoryPressure, .memoryPressure(source: "limit", count: 120, usageBytes: 33_000_000, limitBytes: 33_554_432, psiSomeAvg10Permille: 125,
                                              intervalNs: 1_000_000_000, cgroup: "/lab/node1/redis")),
            (.ioError, .ioError(error: ENOSPC, syscall: "write", count: 31, intervalNs: 1_000_000_000)),
        ]
        let events = details.enumerated().map { i, d in
            TapioEvent(kind: d.0, timeNs: 1_795_000_000_000_000_000 + Int64(i), pid: 10, comm: "api", cgroupId: 7, netns: 4026531840,
                       containerId: "c0ffee", pod: "api-7d9f", namespace: "shop", detail: d.1)
        }
        let batch = EventBatch(node: "n", epoch: 1, sequence: 1, events: events)
        XCTAssertEqual(try EventBatch.decode(batch.encoded()), batch)
    }

    /// CPU usage rides on `cpu_throttle` as new fields: an event of an agent
    /// that does not report it has none, in JSON and in the engine's stored
    /// events (checkpoints written before the fields existed still read).
    func testCPUUsageIsAbsentFromOlderEventsAndShownWhenReported() throws {
        let old = #"{"cpuThrottle":{"periods":10,"throttledPeriods":3,"throttledNs":5,"intervalNs":1000000000,"cgroup":"/kubepods"}}"#
        let decoded = try JSONDecoder().decode(TapioEvent.Detail.self, from: Data(old.utf8))
        XCTAssertEqual(decoded, .cpuThrottle(periods: 10, throttledPeriods: 3, throttledNs: 5, intervalNs: 1_000_000_000, cgroup: "/kubepods", usage: nil))
        XCTAssertNil(TapioEvent(kind: .cpuThrottle, timeNs: 0, detail: decoded).detailFields["usage_ns"])
        let batch = EventBatch(node: "n", epoch: 1, sequence: 1, events: [TapioEvent(kind: .cpuThrottle, timeNs: 1, detail: decoded)])
        XCTAssertEqual(try EventBatch.decode(batch.encoded()).events.first?.detail, decoded)

        let root = TapioEvent(kind: .cpuThrottle, timeNs: 0, detail: .cpuThrottle(
            periods: 0, throttledPeriods: 0, throttledNs: 0, intervalNs: 1_000_000_000, cgroup: "/",
            usage: CPUUsage(usageNs: 1_500_000_000, pressure: CPUPressure(someAvg10Permille: 255, someStallNs: 200_000_000),
                            node: NodeCPU(cpus: 2, runnable: 4, pressure: nil))))
        let f = root.detailFields
        XCTAssertEqual(f["usage_ns"], .int(1_500_000_000))
        XCTAssertEqual(f["psi_some_avg10"], .double(25.5))
        XCTAssertEqual(f["psi_some_stall_ns"], .int(200_000_000))
        XCTAssertEqual(f["node_cpus"], .int(2))
        XCTAssertEqual(f["node_runnable"], .int(4))
        XCTAssertNil(f["node_psi_some_avg10"], "no node PSI read: none shown")
    }

    func testJSONFieldsNameOutcomesReasonsAndCodes() {
        let connect = TapioEvent(kind: .tcpConnect, timeNs: 0, detail: .tcpConnect(flow: Self.flow, outcome: .timeout, latencyNs: 3, error: ETIMEDOUT, count: 2))
        XCTAssertEqual(connect.detailFields["outcome"], .string("timeout"))
        XCTAssertEqual(connect.detailFields["dst_ip"], .string("10.0.2.7"))
        XCTAssertEqual(connect.detailFields["dst_port"], .int(6379))
        XCTAssertEqual(connect.detailFields["errno"], .string("ETIMEDOUT"))
        let dns = TapioEvent(kind: .dns, timeNs: 0, detail: .dns(name: "x", qtype: 28, rcode: 2, latencyNs: 1, server: nil, serverPort: 0, id: 1, answers: []))
        XCTAssertEqual(dns.detailFields["rcode"], .string("SERVFAIL"))
        XCTAssertEqual(dns.detailFields["qtype"], .string("AAAA"))
        let io = TapioEvent(kind: .ioError, timeNs: 0, detail: .ioError(error: ENOSPC, syscall: "fsync", count: 1, intervalNs: 1))
        XCTAssertEqual(io.detailFields["errno"], .string("ENOSPC"))
        let listen = TapioEvent(kind: .tcpListen, timeNs: 0, detail: .tcpListen(address: nil, port: 80, open: true))
        XCTAssertEqual(listen.detailFields["state"], .string("open"))
    }

    func testIPv4MappedAddressesPrintAsIPv4() {
        var raw = [UInt8](repeating: 0, count: 16)
        raw[10] = 0xff
        raw[11] = 0xff
        raw[12...15] = [10, 0, 0, 1]
        XCTAssertEqual(IPAddress(family: UInt16(AF_INET6), raw: raw)?.description, "10.0.0.1")
        XCTAssertEqual(IPAddress("::1")?.description, "::1")
        XCTAssertNil(IPAddress("not-an-ip"))
    }

    func testInventoryRoundTrips() throws {
        let inv = Inventory(pods: [
            PodInfo(uid: "u1", name: "redis-0", namespace: "shop", node: "node-3", ips: ["10.0.3.4"], service: "redis", ownerKind: "StatefulSet",
                    ownerName: "redis", labels: ["app": "redis", "tier": "store"], containerIds: ["abc"]),
            PodInfo(uid: "u2", name: "api-1", namespace: "shop", node: "node-1"),
        ])
        XCTAssertEqual(try Inventory.decode(inv.encoded()), inv)
    }
}
