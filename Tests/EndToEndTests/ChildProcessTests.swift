import Foundation
import TapioTestSupport
import XCTest

/// A program a test starts inherits none of the test process's sockets: a
/// server in the test process that stops frees its port even while a child
/// started meanwhile still runs, so it can start again on the same port.
final class ChildProcessTests: XCTestCase {
    /// A listening socket on 127.0.0.1 without close-on-exec, as NIO opens them; its port.
    private func openListener(port: UInt16 = 0) throws -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = port.bigEndian
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 8) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw TestSupportError("listening on 127.0.0.1:\(port): \(reason)")
        }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        XCTAssertEqual(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0, "the socket is inheritable, as NIO's are")
        return (fd, UInt16(bigEndian: addr.sin_port))
    }

    func testAListenerClosedWhileAChildRunsCanListenAgainOnItsPort() throws {
        let first = try openListener()
        let dir = try TestSupport.temporaryDirectory("tapio-child")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let child = try ChildProcess("/bin/sleep", ["30"], logPath: dir + "/log")
        defer { child.stop(signal: SIGKILL) }
        // Exec'd: whatever it inherits, it holds now.
        XCTAssertTrue(eventually { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(child.pid)/exe"))?.hasSuffix("sleep") ?? false })
        // Right after the exec the dynamic loader (and sleep's setlocale)
        // open a file or two for a moment; an inherited descriptor would
        // stay for good.
        var held: [Int32] = []
        XCTAssertTrue(eventually(timeout: 10) {
            held = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(child.pid)/fd")) ?? []).compactMap(Int32.init).sorted()
            return held == [0, 1, 2]
        }, "the child has stdin, stdout and stderr only: \(held)")
        close(first.fd)
        XCTAssertTrue(child.isRunning)
        let again = try openListener(port: first.port)
        close(again.fd)
    }

    func testRunGivesTheProgramNoSocketOfTheTest() throws {
        let listener = try openListener()
        defer { close(listener.fd) }
        let r = try TestSupport.run("/bin/sh", ["-c", "ls -l /proc/$$/fd"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains(" 2 -> "), "the listing is the shell's descriptors:\n\(r.stdout)")
        XCTAssertFalse(r.stdout.contains("socket:["), "the shell holds no socket:\n\(r.stdout)")
    }
}
