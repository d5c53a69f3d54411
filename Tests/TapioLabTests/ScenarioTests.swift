import Foundation
import TapioLab
import TapioTestSupport
import TapioWire
import XCTest

final class ScenarioTests: XCTestCase {
    private let lab = TestSupport.packageRoot + "/lab"

    func testEveryBuiltInScenarioLoadsAndNamesContractKinds() throws {
        let names = LabFiles.scenarioNames(labDirectory: lab)
        XCTAssertGreaterThanOrEqual(names.count, 3)
        for name in names {
            let s = try LabFiles.resolve(name, labDirectory: lab)
            XCTAssertEqual(s.name, name, "a scenario's name is its file name")
            XCTAssertFalse(s.requestPath.services.isEmpty)
            for c in s.expected { XCTAssertTrue(Cause.kinds.contains(c.kind), "\(name): \(c.kind)") }
        }
        let smoke = try LabFiles.resolve(lab + "/smoke/oom-kill-short.json", labDirectory: lab)
        XCTAssertLessThanOrEqual(smoke.timing.warmupS + smoke.timing.observeS, 20, "the test suite's scenario stays short")
    }

    /// A negative clock offset reaches the agent as one word: as two,
    /// "-2500" would be read as an option.
    func testANegativeClockOffsetIsPassedAsOneWord() throws {
        XCTAssertEqual(LabPlan.clockOffsetArgument(ms: -2500), "--lab-clock-offset-ms=-2500")
        let s = try LabFiles.resolve("clock-skew-behind", labDirectory: lab)
        XCTAssertEqual(s.node("node3")?.clockOffsetMs, -2500)
    }

    /// Each pod has its own address from its node's pod CIDR (a namespace of
    /// its own, a veth to its node), so peers are pods, not nodes.
    func testPodsHaveAddressesFromTheirNodesPodCIDR() throws {
        let s = try LabFiles.resolve("noisy-neighbour", labDirectory: lab)
        let plan = LabPlan(scenario: s, id: "abc123", runDirectory: "/tmp/r", labDirectory: lab)
        XCTAssertEqual(plan.podCIDR("node1"), "10.77.1.0/24")
        XCTAssertEqual(plan.podGateway("node2"), "10.77.2.1")
        XCTAssertEqual(plan.serviceIP("frontend"), "10.77.1.11")
        XCTAssertEqual(plan.serviceIP("api"), "10.77.2.11")
        XCTAssertEqual(plan.serviceIP("batch-hog"), "10.77.2.12", "the second pod on node2")
        XCTAssertEqual(plan.serviceIP("redis"), "10.77.3.11")
        XCTAssertEqual(Set(s.services.map { plan.podNetns($0.name) }).count, s.services.count, "a namespace per pod")
        XCTAssertTrue(s.services.allSatisfy { plan.podVeth($0.name).utf8.count <= 15 }, "interface names fit IFNAMSIZ")
    }

    /// Two replicas of one Deployment behind a ClusterIP: one DNS record (the
    /// VIP), kube-proxy's chains DNAT to each pod at random, and both pods are
    /// the same service to Tapio (app label, template hash, ReplicaSet).
    func testReplicasBehindAClusterIPAreOneServiceWithKubeProxyRules() throws {
        let s = try LabFiles.resolve("service-replicas", labDirectory: lab)
        let plan = LabPlan(scenario: s, id: "abc123", runDirectory: "/tmp/r", labDirectory: lab)
        let replica = try XCTUnwrap(s.service("api-b"))
        XCTAssertEqual(replica.type, .api, "a replica takes the fields it does not set from the pod it replicates")
        XCTAssertEqual(replica.upstream, "redis")
        XCTAssertEqual(replica.node, "node1")
        XCTAssertEqual(replica.app, "api")
        XCTAssertEqual(plan.serviceIP("api-b"), "10.77.1.12", "the second pod on node1")
        XCTAssertNil(replica.clusterIp)
        let vip = try XCTUnwrap(plan.clusterIP("api"))
        XCTAssertNil(plan.clusterIP("redis"))
        XCTAssertTrue(plan.hostsFile.contains("\(vip) api.tapio.lab\n"), plan.hostsFile)
        XCTAssertFalse(plan.hostsFile.contains("api-b"), "a replica has no DNS name of its own")
        XCTAssertEqual(plan.endpoints("api"), ["api", "api-b"])
        let a = plan.pod("api"), b = plan.pod("api-b")
        XCTAssertEqual(a.templateHash, b.templateHash)
        XCTAssertNotEqual(a.uid, b.uid)
        XCTAssertNotEqual(a.name, b.name)
        XCTAssertTrue(b.name.hasPrefix("api-\(a.templateHash)-"), b.name)
        let items = try XCTUnwrap(plan.podList(node: "node1", createdAt: "2026-01-01T00:00:00Z")["items"]?.arrayValue)
        let pod = try XCTUnwrap(items.first { $0["metadata"]?["name"]?.stringValue == b.name })
        XCTAssertEqual(pod["metadata"]?["labels"]?["app"]?.stringValue, "api")
        XCTAssertEqual(pod["metadata"]?["ownerReferences"]?.arrayValue?.first?["name"]?.stringValue, "api-\(a.templateHash)")
        XCTAssertEqual(pod["status"]?["podIP"]?.stringValue, plan.serviceIP("api-b"))

        let rules = plan.serviceRules.map { $0.joined(separator: " ") }
        XCTAssertTrue(rules.contains("-A PREROUTING -j KUBE-SERVICES"))
        let svc = try XCTUnwrap(rules.first { $0.hasPrefix("-A KUBE-SERVICES -d \(vip)/32 -p tcp --dport 8080 -j KUBE-SVC-") })
        let chain = String(svc.split(separator: " ").last!)
        let jumps = rules.filter { $0.hasPrefix("-A \(chain) ") }
        XCTAssertEqual(jumps.count, 2)
        XCTAssertTrue(jumps[0].contains("-m statistic --mode random --probability 0.50000 -j KUBE-SEP-"), jumps[0])
        XCTAssertFalse(jumps[1].contains("statistic"), "the last endpoint takes what is left")
        for ep in ["api", "api-b"] {
            XCTAssertTrue(rules.contains { $0.contains("-j DNAT --to-destination \(plan.serviceIP(ep)):8080") }, "\(ep): \(rules)")
        }
        XCTAssertTrue(LabPlan(scenario: try LabFiles.resolve("oom-kill", labDirectory: lab), id: "x", runDirectory: "/r", labDirectory: lab)
            .serviceRules.isEmpty, "no ClusterIP, no rules")
    }

    /// The DNS timeout fault drops the queries that carry the name, as the
    /// name is on the wire (length-prefixed labels).
    func testDNSTimeoutMatchesTheNameAsItIsOnTheWire() throws {
        XCTAssertEqual(LabPlan.dnsQueryMatch("redis.tapio.lab"), "|05726564697305746170696f036c616200|")
        let s = try LabFiles.resolve("dns-timeout", labDirectory: lab)
        XCTAssertEqual(s.faults.first?.string("rcode"), "TIMEOUT")
        XCTAssertEqual(s.expected, [Cause(entity: "redis.tapio.lab", kind: "dns_failure")])
        // Two application tiers: the api calls the catalog api, which calls redis.
        let tiers = try LabFiles.resolve("api-tiers-oom", labDirectory: lab)
        XCTAssertEqual(tiers.requestPath.services, ["frontend", "api", "catalog", "redis"])
        XCTAssertEqual(tiers.requestPath.dnsNames, ["api.tapio.lab", "catalog.tapio.lab", "redis.tapio.lab"])
    }

    /// The baseline sees every service on the nodes the failing path crosses:
    /// the red herring's crashing cron job on node1 too.
    func testBaselineScopeIsTheServicesOnThePathsNodes() throws {
        let s = try LabFiles.resolve("red-herring", labDirectory: lab)
        XCTAssertEqual(Set(s.requestPath.services), ["frontend", "api", "redis"])
        XCTAssertEqual(s.baselineScope, ["frontend", "api", "redis", "cron-cleanup"])
    }

    func testExtendsMergesServicesByNameAndAppendsNewOnes() throws {
        let dir = try TestSupport.temporaryDirectory("tapio-lab-scenario")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/x.json"
        try """
            {"extends": "three-tier",
             "services": [{"name": "redis", "memory_limit_mb": 32},
                          {"name": "hog", "type": "command", "node": "node3", "argv": ["/bin/true"], "start": "on_fault"}],
             "faults": [{"type": "start", "target": "hog", "at_s": 1}],
             "expected": [{"entity": "hog", "kind": "noisy_neighbour"}]}
            """.write(toFile: path, atomically: true, encoding: .utf8)
        let s = try Scenario.load(path: path, labDirectory: lab)
        XCTAssertEqual(s.name, "x")
        XCTAssertEqual(s.service("redis")?.memoryLimitMb, 32)
        XCTAssertEqual(s.service("redis")?.type, .redis, "fields the scenario does not set come from the base")
        XCTAssertEqual(s.services.map(\.name), ["frontend", "api", "redis", "hog"])
        XCTAssertEqual(s.requestPath.services, ["frontend", "api", "redis"])
        XCTAssertEqual(s.requestPath.dnsNames, ["api.tapio.lab", "redis.tapio.lab"])
    }

    func testValidationRejectsUnknownFaultsAndKinds() throws {
        let dir = try TestSupport.temporaryDirectory("tapio-lab-scenario")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (body, message) in [
            (#"{"extends": "three-tier", "faults": [{"type": "meteor", "target": "redis", "at_s": 1}]}"#, "unknown fault type"),
            (#"{"extends": "three-tier", "expected": [{"entity": "redis", "kind": "sadness"}]}"#, "not a root-cause kind"),
            (#"{"extends": "three-tier", "faults": [{"type": "stop", "target": "nope", "at_s": 1}]}"#, "unknown service"),
            (#"{"extends": "three-tier", "services": [{"name": "api-b", "replica_of": "nope", "node": "node3"}]}"#, "not a service of its own"),
            (#"{"extends": "three-tier", "services": [{"name": "api", "cluster_ip": true}, {"name": "api-b", "replica_of": "api", "node": "node3", "start": "on_fault"}], "faults": [{"type": "scale", "target": "api-b", "at_s": 1, "params": {"joins": "api"}}]}"#, "cluster_ip service"),
        ] {
            try body.write(toFile: dir + "/bad.json", atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try Scenario.load(path: dir + "/bad.json", labDirectory: lab)) { error in
                XCTAssertTrue("\(error)".contains(message), "\(error)")
            }
        }
    }

    func testPodListIsKubernetesShapedAndMatchesTheCgroupLayout() throws {
        let s = try LabFiles.resolve("oom-kill", labDirectory: lab)
        let plan = LabPlan(scenario: s, id: "abc123", runDirectory: "/tmp/r", labDirectory: lab)
        let list = plan.podList(node: "node3", createdAt: "2026-01-01T00:00:00Z")
        XCTAssertEqual(list["kind"]?.stringValue, "List")
        let items = try XCTUnwrap(list["items"]?.arrayValue)
        XCTAssertEqual(items.count, 1)
        let pod = items[0]
        let redis = plan.pod("redis")
        XCTAssertEqual(pod["metadata"]?["name"]?.stringValue, redis.name)
        XCTAssertEqual(pod["metadata"]?["labels"]?["app"]?.stringValue, "redis")
        XCTAssertEqual(pod["metadata"]?["uid"]?.stringValue, redis.uid)
        XCTAssertEqual(pod["spec"]?["nodeName"]?.stringValue, "node3")
        XCTAssertEqual(pod["status"]?["podIP"]?.stringValue, plan.serviceIP("redis"))
        let cid = pod["status"]?["containerStatuses"]?.arrayValue?.first?["containerID"]?.stringValue
        XCTAssertEqual(cid, "containerd://" + redis.containerId)
        // The kubelet's cgroupfs layout: the pod uid and the container id are in the path.
        XCTAssertEqual(plan.containerCgroup("redis"), "tapio-lab/abc123/node3/kubepods/pod\(redis.uid)/\(redis.containerId)")
        XCTAssertEqual(redis.containerId.count, 64)
        XCTAssertTrue(redis.uid.range(of: #"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"#, options: .regularExpression) != nil)
        // Deterministic from the scenario and its seed, different per service.
        XCTAssertEqual(LabPlan(scenario: s, id: "other", runDirectory: "/x", labDirectory: lab).pod("redis"), redis)
        XCTAssertNotEqual(plan.pod("api").containerId, redis.containerId)
        XCTAssertTrue(plan.hostsFile.contains("\(plan.serviceIP("redis")) redis.tapio.lab\n"))
    }
}
