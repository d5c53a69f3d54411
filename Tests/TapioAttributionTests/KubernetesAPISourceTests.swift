import Foundation
import TapioAttribution
import TapioTestSupport
import XCTest

/// The Kubernetes API path against a real HTTP server on 127.0.0.1.
///
/// No API server can run on these machines, so `Fixtures/fake_apiserver.py`
/// stands in for the pod endpoints: it serves the recorded fixture pods (real
/// objects captured from clusters with `kubectl get -o json`) as a PodList for
/// a list and as ADDED / MODIFIED / DELETED / BOOKMARK / ERROR watch lines in
/// chunks split mid-line, following a fixed script (see the script's
/// docstring). What is real: the sockets, HTTP/1.1, chunked framing, the
/// objects' JSON. What is not: an API server's own behaviour beyond that
/// script, and TLS (the connector here is plain TCP).
final class KubernetesAPISourceTests: XCTestCase {
    private var dir = ""
    private var server: ChildProcess?
    private var port = 0
    private let token = "eyJhbGciOiJSUzI1NiJ9.test-token"

    override func setUpWithError() throws {
        dir = try TestSupport.temporaryDirectory("tapio-kube")
        port = TestSupport.freePort()
        server = try ChildProcess(TestSupport.systemPython, [
            Fixtures.directory + "/fake_apiserver.py", "--port", String(port), "--fixtures", Fixtures.directory,
            "--log", dir + "/requests.log", "--token", token,
        ], logPath: dir + "/server.log")
        let up = eventually(timeout: 20) { (try? TCPByteStream.connect(host: "127.0.0.1", port: UInt16(port), timeoutMs: 200)) != nil }
        XCTAssertTrue(up, "fake API server did not start: \(server?.log ?? "")")
        try Data((token + "\n").utf8).write(to: URL(fileURLWithPath: dir + "/token"))
    }

    override func tearDown() {
        server?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func configuration() -> KubernetesAPIConfiguration {
        var c = KubernetesAPIConfiguration(endpoint: HTTPEndpoint(isTLS: false, host: "127.0.0.1", port: UInt16(port)),
                                           nodeName: "controlplane", tokenFile: dir + "/token")
        c.requestTimeout = 10
        c.retryDelay = 0.05
        return c
    }

    private func requests() -> [(path: String, authorization: String)] {
        let text = (try? String(contentsOfFile: dir + "/requests.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            guard let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String] else { return nil }
            return (o["path"] ?? "", o["authorization"] ?? "")
        }
    }

    func testListThenWatchAppliesEveryEventAndResumesFromTheLastVersion() throws {
        let index = PodIndex()
        let source = KubernetesAPISource(configuration: configuration(), index: index)

        XCTAssertEqual(try source.list(), "1000")
        XCTAssertEqual(index.allPods.map(\.name), ["elephant", "rabbit"], "only this node's pods")
        XCTAssertEqual(index.pod(containerId: Fixtures.oomContainer)?.container.lastTermination?.reason, "OOMKilled")

        XCTAssertEqual(try source.watch(from: "1000"), .closed(resourceVersion: "1004"))
        XCTAssertEqual(index.allPods.map(\.name), ["elephant", "queue-l4dv8"])
        XCTAssertEqual(index.pod(uid: Fixtures.elephantUID)?.service, "elephant-svc", "MODIFIED applied")
        XCTAssertEqual(index.pod(ip: "172.17.0.6")?.name, "queue-l4dv8", "ADDED applied")
        XCTAssertNil(index.pod(ip: "10.42.0.9"), "DELETED applied")
        XCTAssertEqual(index.pod(containerId: Fixtures.crashloopContainer)?.pod.name, "rabbit", "late events still find a deleted pod")
        XCTAssertEqual(source.status.events, 4)

        XCTAssertEqual(try source.watch(from: "1004"), .expired, "ERROR event with a 410 Status")
        XCTAssertEqual(try source.list(), "2000")
        XCTAssertEqual(try source.watch(from: "2000"), .expired, "HTTP 410 Gone")

        let log = requests()
        XCTAssertEqual(log.count, 5)
        XCTAssertTrue(log.allSatisfy { $0.authorization == "Bearer " + token }, "token read from the file, newline trimmed")
        XCTAssertEqual(log[0].path, "/api/v1/pods?fieldSelector=spec.nodeName%3Dcontrolplane")
        XCTAssertTrue(log[1].path.hasPrefix("/api/v1/pods?fieldSelector=spec.nodeName%3Dcontrolplane&watch=1&"))
        XCTAssertTrue(log[1].path.contains("resourceVersion=1000"))
        XCTAssertTrue(log[2].path.contains("resourceVersion=1004"))
    }

    func testRunRelistsOnGoneAndKeepsWatching() throws {
        let index = PodIndex()
        let source = KubernetesAPISource(configuration: configuration(), index: index)
        source.start()
        defer { source.stop() }
        XCTAssertTrue(eventually(timeout: 20) { source.status.lists == 3 && requests().count >= 7 },
                      "status \(source.status), requests \(requests().map(\.path))")
        let status = source.status
        XCTAssertEqual(status.relists, 2)
        XCTAssertEqual(status.failures, 0, status.lastError ?? "")
        XCTAssertEqual(status.resourceVersion, "3000")
        XCTAssertTrue(status.synced)
        XCTAssertEqual(index.allPods.map(\.name), ["elephant", "queue-l4dv8"])
        let versions = requests().filter { $0.path.contains("watch=1") }.map { $0.path.components(separatedBy: "resourceVersion=").last ?? "" }
        XCTAssertEqual(versions, ["1000", "1004", "2000", "3000"])
    }

    func testAWrongTokenIsAnError() throws {
        var c = configuration()
        c.tokenFile = nil
        c.token = "wrong"
        let source = KubernetesAPISource(configuration: c, index: PodIndex())
        XCTAssertThrowsError(try source.list()) { error in
            XCTAssertEqual((error as? HTTPError)?.status, 401)
        }
    }

    func testHTTPSWithoutATLSConnectorIsRefusedClearly() throws {
        let c = KubernetesAPIConfiguration(endpoint: HTTPEndpoint(isTLS: true, host: "127.0.0.1", port: UInt16(port)), nodeName: "n", token: "t")
        XCTAssertThrowsError(try KubernetesAPISource(configuration: c, index: PodIndex()).list()) { error in
            XCTAssertTrue("\(error)".contains("needs TLS"), "\(error)")
        }
    }

    func testInClusterConfigurationComesFromTheEnvironmentAndServiceAccount() throws {
        let sa = dir + "/sa"
        try FileManager.default.createDirectory(atPath: sa, withIntermediateDirectories: true)
        try Data("tok".utf8).write(to: URL(fileURLWithPath: sa + "/token"))
        let c = try KubernetesAPIConfiguration.inCluster(nodeName: "node-1",
                                                         environment: ["KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"],
                                                         serviceAccountDirectory: sa)
        XCTAssertEqual(c.endpoint, HTTPEndpoint(isTLS: true, host: "fd00::1", port: 6443))
        XCTAssertEqual(c.tokenFile, sa + "/token")
        XCTAssertEqual(c.caFile, sa + "/ca.crt")
        XCTAssertThrowsError(try KubernetesAPIConfiguration.inCluster(nodeName: "n", environment: [:], serviceAccountDirectory: sa))
    }
}
