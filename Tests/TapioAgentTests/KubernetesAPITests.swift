import Foundation
import TapioAgent
import TapioAttribution
import TapioTestSupport
import XCTest

/// The agent reaches the Kubernetes API over its own TLS client: server
/// verified against the CA, no client certificate, bearer token. No API server
/// can run here: the stand-in serves real recorded pod objects (see
/// Tests/TapioAttributionTests) over https with a certificate of our own CA.
final class KubernetesAPITests: XCTestCase {
    func testPodsAreListedOverTLSAndAForeignCAIsRefused() throws {
        let dir = try TestSupport.temporaryDirectory("tapio-kube-tls")
        let pki = try TestSupport.makePKI(in: dir, nodes: [])
        let fixtures = TestSupport.packageRoot + "/Tests/TapioAttributionTests/Fixtures"
        let port = TestSupport.freePort()
        let token = "test-token"
        try Data(token.utf8).write(to: URL(fileURLWithPath: dir + "/token"))
        let server = try ChildProcess(TestSupport.systemPython, [
            fixtures + "/fake_apiserver.py", "--port", String(port), "--fixtures", fixtures, "--log", dir + "/requests.log", "--token", token,
            "--tls-cert", pki + "/server/tls.crt", "--tls-key", pki + "/server/tls.key",
        ], logPath: dir + "/server.log")
        defer { server.stop() }
        XCTAssertTrue(eventually { (try? TCPByteStream.connect(host: "127.0.0.1", port: UInt16(port), timeoutMs: 200)) != nil }, server.log)

        func source(ca: String) -> (KubernetesAPISource, PodIndex) {
            var c = KubernetesAPIConfiguration(endpoint: HTTPEndpoint(isTLS: true, host: "127.0.0.1", port: UInt16(port)), nodeName: "controlplane",
                                               tokenFile: dir + "/token", caFile: ca, connector: Agent.kubernetesConnector)
            c.requestTimeout = 10
            let index = PodIndex()
            return (KubernetesAPISource(configuration: c, index: index), index)
        }
        let (good, index) = source(ca: pki + "/ca/ca.crt")
        XCTAssertEqual(try good.list(), "1000")
        XCTAssertEqual(index.allPods.map(\.name), ["elephant", "rabbit"])

        let other = try TestSupport.makePKI(in: try TestSupport.temporaryDirectory("tapio-kube-other"), nodes: [])
        let (bad, _) = source(ca: other + "/ca/ca.crt")
        XCTAssertThrowsError(try bad.list()) { XCTAssertTrue("\($0)".contains("verif"), "\($0)") }
    }
}
