import Foundation
import TapioCorrelation
import TapioWire
import XCTest

/// One test per causal rule: a healthy stream, one fault at t = 30 s, the
/// expected top-1 root cause.
final class RuleTests: XCTestCase {
    func top(_ c: SyntheticCluster, file: StaticString = #filePath, line: UInt = #line) -> (Incident, RootCause)? {
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 1, "incidents: \(incidents.map(\.title))", file: file, line: line)
        guard let inc = incidents.first, let rc = inc.rootCauses.first else {
            XCTFail("no root cause", file: file, line: line)
            return nil
        }
        return (inc, rc)
    }

    static func redisOOM(_ c: inout SyntheticCluster, at t0: Double = 30, until: Double = 45) {
        c.oom(t0, "redis")
        c.exit(t0 + 0.001, "redis", signal: 9)
        c.listen(t0 + 0.002, "redis", open: false)
        var t = t0 + 0.05
        while t < until {
            c.connect(t, "api", "redis", .refused, count: 3)
            t += 0.5
        }
    }

    func testOOMKillExplainsRefusedConnections() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        RuleTests.redisOOM(&c)
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .oomKill)
        XCTAssertGreaterThan(rc.confidence, 0.8)
        XCTAssertTrue(inc.symptoms.contains { $0.entity == "api" && $0.kind == .connectRefused && $0.peer == "redis" })
        XCTAssertEqual(inc.affected.services, ["api", "redis"])
        XCTAssertEqual(inc.affected.nodes, ["node2", "node3"])
        XCTAssertTrue(inc.affected.pods.contains("redis-0"))
        let topology = rc.factors.first { $0.name == "topology_match" }!
        XCTAssertEqual(topology.value, 1.0, "the failing peer address is the OOM-killed pod's")
        XCTAssertTrue(rc.evidence.contains { $0.contains("oom_kill") })
        // The exit and the closed listener are the OOM kill, not candidates of their own.
        XCTAssertFalse(inc.rootCauses.contains { $0.entity == "redis" && [.crash, .listenerClosed].contains($0.kind) })
        XCTAssertEqual(inc.status, .open)
    }

    func testListenerClosedExplainsRefusedConnections() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        c.listen(30, "redis", open: false)
        var t = 30.05
        while t < 45 { c.connect(t, "api", "redis", .refused, count: 3); t += 0.5 }
        guard let (_, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .listenerClosed)
        XCTAssertGreaterThan(rc.confidence, 0.8)
    }

    func testCrashLoopExplainsRefusedConnectionsAndExits() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 50, skip: ["frontend>api"])
        for (i, t) in [30.0, 33, 36, 39, 42, 45].enumerated() {
            c.exec(t - 0.5, "api", pid: 400 + UInt32(i), comm: "python3", file: "/usr/bin/python3")
            c.exit(t, "api", code: 1, pid: 400 + UInt32(i), comm: "python3")
        }
        var t = 30.1
        while t < 50 { c.connect(t, "frontend", "api", .refused, count: 4); t += 0.5 }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "api")
        XCTAssertEqual(rc.kind, .crashLoop)
        XCTAssertTrue(inc.symptoms.contains { $0.entity == "api" && $0.kind == .exits })
        XCTAssertTrue(inc.symptoms.contains { $0.entity == "frontend" && $0.kind == .connectRefused })
    }

    func testFirewallDropExplainsConnectTimeouts() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        var t = 30.0
        while t < 45 {
            // SYNs dropped by netfilter on redis's node: the SYN's source port is zeroed.
            let syn = Flow(source: IPAddress("10.0.2.10"), destination: IPAddress("10.0.3.10"), sourcePort: 0, destinationPort: 6379)
            c.add(t, "redis", .packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: 4, flow: syn, ipProtocol: 6, ifindex: 2, intervalNs: 500_000_000),
                  pid: 0, attributed: false, comm: "")
            if t >= 31 { c.connect(t + 0.01, "api", "redis", .timeout, count: 2) }
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .firewallDrop)
        XCTAssertGreaterThan(rc.confidence, 0.8)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .connectTimeout })
    }

    /// Random loss made by netfilter (iptables statistic) has the same kernel
    /// reason as a firewall DROP; segments of established flows tell it apart.
    func testNetfilterDropsOfEstablishedFlowsArePacketLoss() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        var t = 30.0
        while t < 45 {
            let segment = Flow(source: IPAddress("10.0.2.10"), destination: IPAddress("10.0.3.10"), sourcePort: 40000, destinationPort: 6379)
            c.add(t, "redis", .packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: 12, flow: segment, ipProtocol: 6, ifindex: 2, intervalNs: 500_000_000),
                  pid: 0, attributed: false, comm: "")
            c.add(t + 0.02, "api", .tcpRetransmit, .tcpRetransmit(flow: c.flow("api", "redis"), count: 10, intervalNs: 500_000_000))
            c.connect(t + 0.03, "api", "redis", .established, count: 4)
            c.latency(t + 0.04, "api", "redis", ms: 60)
            t += 0.5
        }
        guard let (_, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .packetLoss)
    }

    /// tbf on redis's node drops its replies (to the api's `clientPort(t)`);
    /// the api retransmits and waits. Healthy traffic otherwise.
    func qdiscDropsRedisReplies(_ c: inout SyntheticCluster, from: Double, until: Double, clientPort: (Double) -> UInt16 = { _ in 40000 }) {
        c.healthy(from: from, until: until, skip: ["api>redis"])
        for t in stride(from: from, to: until, by: 0.5) {
            let reply = Flow(source: IPAddress("10.0.3.10"), destination: IPAddress("10.0.2.10"), sourcePort: 6379, destinationPort: clientPort(t))
            c.add(t, "redis", .packetDrop, .packetDrop(reason: "QDISC_DROP", count: 20, flow: reply, ipProtocol: 6, ifindex: 2, intervalNs: 500_000_000))
            c.add(t + 0.02, "api", .tcpRetransmit, .tcpRetransmit(flow: c.flow("api", "redis"), count: 15, intervalNs: 500_000_000))
            c.connect(t + 0.03, "api", "redis", .established, count: 4)
            c.latency(t + 0.04, "api", "redis", ms: 80)
        }
    }

    func testQdiscDropsExplainRetransmitsAndLatency() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        qdiscDropsRedisReplies(&c, from: 30, until: 45)
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .packetLoss)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .retransmits && $0.entity == "api" })
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .latency && $0.entity == "api" })
    }

    /// The same drops after a latency sample read the wrong way round (the
    /// api's client socket measured as a server, its server port zeroed: a
    /// stale socket entry in an agent) taught the graph an edge redis → api.
    /// Redis's port is the one seen serving, so its drops towards the api's
    /// port are still redis's: the graph's edges both ways do not hand the
    /// drops to the api (a bandwidth-limit lab run once tied api/packet_loss
    /// with redis/packet_loss).
    func testAFlowIsOrientedByTheServingPortEvenWithGraphEdgesBothWays() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        // node3's agent: the api's socket as if it served (server port zeroed), unattributed.
        let reversed = Flow(source: IPAddress("10.0.2.10"), destination: IPAddress("10.0.3.10"), sourcePort: 40010, destinationPort: 0)
        c.add(29, "redis", .tcpLatency, .tcpLatency(flow: reversed, srttUs: 200, responses: 1, responseNsTotal: 100_000, responseNsMax: 100_000,
                                                   intervalNs: 1_000_000_000), pid: 0, attributed: false, comm: "")
        qdiscDropsRedisReplies(&c, from: 30, until: 45, clientPort: { 40000 + UInt16($0) })
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual("\(rc.entity)/\(rc.kind.rawValue)", "redis/packet_loss")
        XCTAssertFalse(inc.rootCauses.contains { $0.entity == "api" && $0.kind == .packetLoss },
                       "\(inc.rootCauses.map { "\($0.entity)/\($0.kind.rawValue) \($0.confidence)" })")
        XCTAssertFalse(inc.symptoms.contains { $0.entity == "redis" && $0.kind == .packetDrops }, "the drops are the api's symptom towards redis")
    }

    /// A deep queue on redis's way out (tbf): round trips from microseconds
    /// to 300 ms, redis itself answering in 50 µs as before.
    func testASlowPathWhileTheServerAnswersFastIsNetworkLatency() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        var t = 30.0
        while t < 45 {
            c.connect(t, "api", "redis", .established, count: 4)
            c.latency(t + 0.1, "api", "redis", ms: 320, srttUs: 300_000)
            c.served(t + 0.2, "redis", "api", ms: 0.05, srttUs: 290_000)
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .networkLatency)
        XCTAssertGreaterThan(rc.confidence, 0.5)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .latency && $0.entity == "api" && $0.peer == "redis" })
    }

    /// A slow server pads its clients' round trips with delayed ACKs (up to
    /// tens of ms), but its answers take many times that: not the path.
    func testASlowServerIsNoSlowPath() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        var t = 30.0
        while t < 45 {
            c.connect(t, "api", "redis", .established, count: 4)
            c.latency(t + 0.1, "api", "redis", ms: 400, srttUs: 60_000)
            c.served(t + 0.2, "redis", "api", ms: 390, srttUs: 200)
            t += 0.5
        }
        let causes = c.engine().incidents.flatMap(\.rootCauses)
        XCTAssertFalse(causes.isEmpty, "the latency is an incident")
        XCTAssertFalse(causes.contains { $0.kind == .networkLatency }, "\(causes.map { "\($0.entity)/\($0.kind.rawValue)" })")
    }

    /// Where the slow path also drops (a queue that overflows), the drops are
    /// the cause and the slow round trips their evidence.
    func testDropsOnASlowPathMakeItPacketLoss() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        var t = 30.0
        while t < 45 {
            let reply = Flow(source: IPAddress("10.0.3.10"), destination: IPAddress("10.0.2.10"), sourcePort: 6379, destinationPort: 40000)
            c.add(t, "redis", .packetDrop, .packetDrop(reason: "QDISC_DROP", count: 20, flow: reply, ipProtocol: 6, ifindex: 2, intervalNs: 500_000_000))
            c.connect(t + 0.03, "api", "redis", .established, count: 4)
            c.latency(t + 0.1, "api", "redis", ms: 320, srttUs: 300_000)
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .packetLoss)
        XCTAssertFalse(inc.rootCauses.contains { $0.kind == .networkLatency })
        XCTAssertTrue(rc.evidence.contains { $0.contains("srtt 300") }, "\(rc.evidence)")
    }

    func dnsFailure(rcode: Int32) {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["dns", "api>redis"])
        var t = 30.0
        while t < 45 { c.dns(t, "api", name: "redis.shop.svc", rcode: rcode); t += 0.5 }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis.shop.svc")
        XCTAssertEqual(rc.kind, .dnsFailure)
        XCTAssertGreaterThan(rc.confidence, 0.8)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .dnsErrors && $0.entity == "api" && $0.peer == "redis.shop.svc" })
    }

    func testNXDOMAINExplainsDNSErrors() { dnsFailure(rcode: 3) }
    func testSERVFAILExplainsDNSErrors() { dnsFailure(rcode: 2) }

    func testCPUThrottlingExplainsLatency() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["frontend>api"])
        var t = 0.0
        while t < 45 {
            c.throttle(t + 0.2, "api", ratio: t < 30 ? 0 : 0.8)
            if t >= 30 {
                c.connect(t, "frontend", "api", .established, count: 4)
                c.latency(t + 0.3, "frontend", "api", ms: 120)
            }
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "api")
        XCTAssertEqual(rc.kind, .cpuThrottle)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .latency && $0.entity == "frontend" && $0.peer == "api" })
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .throttling && $0.entity == "api" })
    }

    /// The victim's node is short of CPU (its cgroup above the pods is
    /// throttled) while a batch pod uses up its own quota: the batch pod is
    /// the neighbour.
    func testNoisyNeighbourOnTheVictimsNode() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["frontend>api"])
        c.exec(29.5, "batch", file: "/usr/bin/python3")
        var t = 0.0
        while t < 45 {
            c.throttle(t + 0.2, "api", ratio: 0)
            if t >= 30 {
                c.throttle(t + 0.25, "batch", ratio: 0.9)
                c.add(t + 0.26, "api", .cpuThrottle, .cpuThrottle(periods: 10, throttledPeriods: 8, throttledNs: 300_000_000, intervalNs: 1_000_000_000,
                                                                   cgroup: "/kubepods"), pid: 0, attributed: false, comm: "")
                c.connect(t, "frontend", "api", .established, count: 4)
                c.latency(t + 0.3, "frontend", "api", ms: 100)
            }
            t += 0.5
        }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 1, "\(incidents.map(\.title))")
        guard let rc = incidents.first?.rootCauses.first else { return XCTFail("no root cause") }
        XCTAssertEqual(rc.entity, "batch")
        XCTAssertEqual(rc.kind, .noisyNeighbour)
        XCTAssertTrue(incidents[0].symptoms.contains { $0.kind == .latency && $0.peer == "api" })
    }

    func testDiskFullExplainsIOErrorsAndClientsErrors() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>db"])
        var t = 30.0
        while t < 45 {
            c.add(t, "db", .ioError, .ioError(error: 28, syscall: "write", count: 5, intervalNs: 500_000_000))
            c.add(t + 0.1, "api", .tcpReset, .tcpReset(flow: c.flow("api", "db"), sent: false, state: 1, count: 6))
            c.connect(t + 0.05, "api", "db", .established, count: 2)
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "db")
        XCTAssertEqual(rc.kind, .diskFull)
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .ioErrors && $0.entity == "db" })
        XCTAssertTrue(inc.symptoms.contains { $0.kind == .resets && $0.entity == "api" && $0.peer == "db" })
    }

    func testThreeTierCascadeFindsTheDeepestCause() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 50, skip: ["api>redis", "frontend>api"])
        RuleTests.redisOOM(&c, until: 50)
        // api cannot reach redis and dies over and over; frontend is refused by api.
        for (i, t) in [30.5, 33.5, 36.5, 39.5].enumerated() {
            c.exit(t, "api", code: 1, pid: 500 + UInt32(i))
        }
        var t = 30.6
        while t < 50 { c.connect(t, "frontend", "api", .refused, count: 4); t += 0.5 }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .oomKill)
        let api = inc.rootCauses.first { $0.entity == "api" }
        XCTAssertNotNil(api, "api's crash loop is a candidate")
        XCTAssertLessThan(api?.confidence ?? 1, rc.confidence)
        XCTAssertEqual(api?.factors.first { $0.name == "deepest" }?.value, 0)
        XCTAssertTrue(inc.symptoms.contains { $0.entity == "frontend" && $0.peer == "api" })
        XCTAssertEqual(inc.affected.services, ["api", "frontend", "redis"])
    }

    func testTwoIndependentFaultsOpenTwoIncidents() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis", "frontend>cart"])
        RuleTests.redisOOM(&c)
        c.listen(32, "cart", open: false)
        var t = 32.05
        while t < 45 { c.connect(t, "frontend", "cart", .refused, count: 3); t += 0.5 }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 2, "\(incidents.map(\.title))")
        let tops = Set(incidents.compactMap { $0.rootCauses.first }.map { "\($0.entity) \($0.kind.rawValue)" })
        XCTAssertEqual(tops, ["redis oom_kill", "cart listener_closed"])
        XCTAssertNotEqual(incidents[0].id, incidents[1].id)
    }

    func testRedHerringAloneOpensNothing() {
        var c = SyntheticCluster()
        c.healthy(until: 60)
        c.oom(30, "worker")
        c.exit(30.001, "worker", signal: 9)
        c.exit(40, "worker", code: 2)
        XCTAssertEqual(c.engine().incidents.count, 0)
    }

    /// A job off every request path that crashes every two seconds (the lab's
    /// red herring) fails nobody: no incident, however often it exits.
    func testACrashLoopOffEveryPathOpensNothing() {
        var c = SyntheticCluster()
        c.healthy(until: 90)
        var pid: UInt32 = 2000
        for t in stride(from: 30.0, to: 60, by: 2) {
            pid += 1
            c.exec(t, "worker", pid: pid, comm: "cleanup", file: "/bin/sh")
            c.exit(t + 1.9, "worker", code: 1, pid: pid, comm: "cleanup")
        }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 0, "\(incidents.map(\.title))")
    }

    /// A rollout stops a pod with SIGTERM and its clients see refusals while it
    /// restarts: not a crash. The same stream with SIGSEGV is one.
    func testAnExitBySIGTERMIsNotACrash() {
        func stream(_ signal: Int32) -> [RootCause] {
            var c = SyntheticCluster()
            c.healthy(until: 30)
            c.healthy(from: 30, until: 45, skip: ["frontend>cart"])
            c.exit(29.9, "cart", signal: signal)
            for t in stride(from: 30.0, to: 45, by: 0.5) { c.connect(t, "frontend", "cart", .refused, count: 5) }
            return c.engine().incidents.flatMap(\.rootCauses).filter { $0.entity == "cart" && ($0.kind == .crash || $0.kind == .crashLoop) }
        }
        XCTAssertFalse(stream(SIGSEGV).isEmpty, "SIGSEGV is a crash")
        XCTAssertTrue(stream(SIGTERM).isEmpty, "SIGTERM is a stop request")
        XCTAssertTrue(stream(SIGINT).isEmpty, "SIGINT is a stop request")
    }

    /// A rolling restart: redis is asked to stop (SIGTERM), its listener
    /// closes, the api is refused for a second, a new redis listens again.
    static func redisRestart(_ c: inout SyntheticCluster, refusalsUntil: Double, reopenAt: Double? = 31.2) {
        c.healthy(until: 30)
        c.healthy(from: 30, until: 60, skip: ["api>redis"])
        c.exit(30, "redis", signal: SIGTERM)
        c.listen(30.001, "redis", open: false)
        var t = 30.05
        while t < refusalsUntil {
            c.connect(t, "api", "redis", .refused, count: 5)
            t += 0.25
        }
        if let r = reopenAt {
            c.exec(r - 0.1, "redis", pid: 311, comm: "redis-server", file: "/usr/bin/redis-server")
            c.add(r, "redis", .tcpListen, .tcpListen(address: IPAddress("0.0.0.0"), port: 6379, open: true), pid: 311)
        }
        t = max(refusalsUntil, r0(reopenAt))
        while t < 60 {
            c.connect(t, "api", "redis", .established, count: 4)
            t += 0.5
        }
    }

    private static func r0(_ r: Double?) -> Double { r ?? 60 }

    func testRestartAfterAStopRequestOpensNothing() {
        var c = SyntheticCluster()
        RuleTests.redisRestart(&c, refusalsUntil: 31.1)
        c.healthy(from: 60, until: 100)  // past the quiet period: the held-back incident resolves unseen
        let engine = c.engine()
        XCTAssertEqual(engine.incidents.count, 0, "\(engine.incidents.map(\.title))")
        XCTAssertEqual(engine.statistics.restartsSuppressed, 1, "the held-back incident is counted")
    }

    func testARestartThatKeepsFailingIsAnIncident() {
        var c = SyntheticCluster()
        RuleTests.redisRestart(&c, refusalsUntil: 45)
        guard let (_, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .listenerClosed)
    }

    /// A stop with no restart is an outage: held back for the restart grace,
    /// then shown, opened at the bucket whose symptom opened it.
    func testAStopWithoutRestartIsShownAfterTheGrace() {
        var c = SyntheticCluster()
        RuleTests.redisRestart(&c, refusalsUntil: 60, reopenAt: nil)
        let cfg = CorrelationConfiguration()
        var engine = CorrelationEngine(configuration: cfg)
        for (node, pods) in c.inventory { engine.updateInventory(node: node, pods: pods) }
        engine.ingest(c.events)
        // The first refusals' bucket has closed, the grace has not passed.
        engine.advance(toNs: SyntheticCluster.ns(32) + cfg.allowedLatenessNs)
        XCTAssertEqual(engine.incidents.count, 0, "held back while a restart may come")
        engine.advance(toNs: SyntheticCluster.ns(36) + cfg.allowedLatenessNs)
        XCTAssertEqual(engine.incidents.count, 1)
        XCTAssertEqual(engine.incidents.first?.rootCauses.first?.entity, "redis")
        XCTAssertEqual(engine.incidents.first?.rootCauses.first?.kind, .listenerClosed)
        XCTAssertLessThanOrEqual(engine.incidents.first?.openedNs ?? .max, SyntheticCluster.ns(32))
    }

    /// A stop request followed by a restart that crashes (a bad configuration
    /// rollout) is not held back as a restart.
    func testARestartIntoCrashesIsNotHeldBack() {
        var c = SyntheticCluster()
        RuleTests.redisRestart(&c, refusalsUntil: 45, reopenAt: nil)
        c.exec(30.9, "redis", pid: 312, comm: "redis-server", file: "/usr/bin/redis-server")
        c.exit(31.0, "redis", code: 1, pid: 312, comm: "redis-server")
        var engine = CorrelationEngine()
        for (node, pods) in c.inventory { engine.updateInventory(node: node, pods: pods) }
        engine.ingest(c.events)
        engine.advance(toNs: SyntheticCluster.ns(32) + engine.configuration.allowedLatenessNs)
        XCTAssertEqual(engine.incidents.count, 1, "shown at once")
        XCTAssertEqual(engine.incidents.first?.rootCauses.first?.entity, "redis")
    }

    /// A listener closed by a crash is never held back.
    func testACrashedListenerIsShownAtOnce() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        c.exit(30, "redis", signal: SIGSEGV)
        c.listen(30.001, "redis", open: false)
        for t in stride(from: 30.05, to: 45, by: 0.25) { c.connect(t, "api", "redis", .refused, count: 5) }
        var engine = CorrelationEngine()
        for (node, pods) in c.inventory { engine.updateInventory(node: node, pods: pods) }
        engine.ingest(c.events)
        engine.advance(toNs: SyntheticCluster.ns(32) + engine.configuration.allowedLatenessNs)
        XCTAssertEqual(engine.incidents.first?.rootCauses.first?.kind, .crash)
    }

    /// The node's own cgroup is throttled (a node-wide CPU limit) and a batch
    /// pod started just before: the pod is the neighbour, not the node.
    func testNodeContentionNamesTheNeighbour() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["frontend>api"])
        c.exec(29.5, "batch", file: "/usr/bin/python3")
        var t = 30.0
        while t < 45 {
            // A cgroup no pod owns: the node's.
            c.add(t + 0.25, "api", .cpuThrottle, .cpuThrottle(periods: 10, throttledPeriods: 9, throttledNs: 400_000_000, intervalNs: 1_000_000_000,
                                                              cgroup: "/kubepods"), pid: 0, attributed: false, comm: "")
            c.connect(t, "frontend", "api", .established, count: 4)
            c.latency(t + 0.3, "frontend", "api", ms: 100)
            t += 0.5
        }
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "batch")
        XCTAssertEqual(rc.kind, .noisyNeighbour)
        XCTAssertFalse(inc.rootCauses.contains { $0.entity == "host@node2" && $0.kind == .noisyNeighbour }, "a node is not its pods' neighbour")
    }

    /// What happens after the symptoms began (a teardown's closed listeners)
    /// is not their cause.
    func testALaterEventIsNoCandidate() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        for t in stride(from: 30.0, to: 45, by: 0.5) {
            let syn = Flow(source: IPAddress("10.0.2.10"), destination: IPAddress("10.0.3.10"), sourcePort: 0, destinationPort: 6379)
            c.add(t, "redis", .packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: 4, flow: syn, ipProtocol: 6, ifindex: 2, intervalNs: 500_000_000),
                  pid: 0, attributed: false, comm: "")
            if t >= 31 { c.connect(t + 0.01, "api", "redis", .timeout, count: 2) }
        }
        c.exit(44, "redis", signal: SIGTERM)
        c.listen(44.001, "redis", open: false)
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.kind, .firewallDrop)
        XCTAssertFalse(inc.rootCauses.contains { $0.kind == .listenerClosed })
    }

    /// A closed listener is reported as it happens: one closed two seconds
    /// after its clients began to time out (a node being torn down) is not
    /// why they fail, though sampled signals get five seconds of lag.
    func testAListenerClosedAfterItsClientsBeganToFailIsNoCause() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["frontend>api"])
        for t in stride(from: 30.0, to: 45, by: 0.5) { c.connect(t, "frontend", "api", .timeout, count: 3) }
        c.listen(31.8, "api", open: false)
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 1, "\(incidents.map(\.title))")
        XCTAssertFalse(incidents.flatMap(\.rootCauses).contains { $0.kind == .listenerClosed }, "\(incidents.map(\.title))")
        XCTAssertFalse(incidents.contains(where: \.pages))
    }

    func testRedHerringIsNotRankedFirst() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        c.exit(29.8, "worker", code: 1)
        c.oom(29.9, "worker")
        RuleTests.redisOOM(&c)
        guard let (inc, rc) = top(c) else { return }
        XCTAssertEqual(rc.entity, "redis")
        XCTAssertEqual(rc.kind, .oomKill)
        if let w = inc.rootCauses.first(where: { $0.entity == "worker" }) { XCTAssertLessThan(w.confidence, 0.5) }
    }

    /// The lab without pod metadata: processes are `<comm>@<node>`, and the
    /// server's address is learned from the server side of its flows.
    func testHostProcessesWithoutInventory() {
        var c = SyntheticCluster()
        var t = 0.0
        while t < 45 {
            if t < 30 {
                c.add(t, "api", .tcpConnect, .tcpConnect(flow: c.flow("api", "redis"), outcome: .established, latencyNs: 300_000, error: 0, count: 4), attributed: false)
                let serverSide = Flow(source: IPAddress("10.0.3.10"), destination: IPAddress("10.0.2.10"), sourcePort: 6379, destinationPort: 0)
                c.add(t + 0.01, "redis", .tcpLatency, .tcpLatency(flow: serverSide, srttUs: 100, responses: 8, responseNsTotal: 800_000, responseNsMax: 200_000,
                                                                  intervalNs: 500_000_000), attributed: false)
            } else if t > 30 {
                c.add(t, "api", .tcpConnect, .tcpConnect(flow: c.flow("api", "redis"), outcome: .refused, latencyNs: 0, error: 111, count: 3), attributed: false)
            }
            t += 0.5
        }
        c.add(30, "redis", .oomKill, .oomKill(victimPid: 301, victimComm: "redis-server", victimUid: 0, totalVmKb: 1, anonRssKb: 1, fileRssKb: 0), attributed: false)
        c.add(30.001, "redis", .processExit, .exit(exitCode: 0, signal: 9, coreDumped: false), attributed: false)
        let incidents = CorrelationEngine.replay(c.events).incidents
        XCTAssertEqual(incidents.count, 1)
        XCTAssertEqual(incidents.first?.symptoms.first?.entity, "python3@node2")
        XCTAssertEqual(incidents.first?.symptoms.first?.peer, "redis-server@node3")
        XCTAssertEqual(incidents.first?.rootCauses.first?.entity, "redis-server@node3")
        XCTAssertEqual(incidents.first?.rootCauses.first?.kind, .oomKill)
    }

    func testHealthyChurnOpensNothing() {
        var c = SyntheticCluster()
        c.healthy(until: 180)
        var t = 0.0
        var pid: UInt32 = 1000
        while t < 180 {
            // Short-lived jobs come and go; once in a while one fails.
            if t.truncatingRemainder(dividingBy: 5) == 0 {
                pid += 1
                c.exec(t, "worker", pid: pid, comm: "job")
                c.exit(t + 1.2, "worker", code: t.truncatingRemainder(dividingBy: 40) == 0 ? 1 : 0, pid: pid, comm: "job")
            }
            // A client polls a port nobody serves, at a constant low rate.
            c.connect(t + 0.3, "frontend", ip: "10.0.9.9", port: 1234, .refused, count: t.truncatingRemainder(dividingBy: 2) == 0 ? 2 : 1)
            // Search-path lookups fail all the time, steadily.
            c.dns(t + 0.2, "api", name: "redis.shop.svc.shop.svc", rcode: 3)
            c.dns(t + 0.21, "api", name: "redis.shop.svc.svc", rcode: 3)
            // Small jitter in latency.
            c.latency(t + 0.4, "frontend", "cart", ms: 3 + Double(Int(t * 2) % 3))
            t += 0.5
        }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 0, "\(incidents.map(\.title))")
    }
}
