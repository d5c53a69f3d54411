import Foundation
import TapioClient
import XCTest

/// Helpers shared by the test targets: real processes, real certificates,
/// and the rule for tests that need root and BPF (skip with a reason, or fail
/// when TAPIO_REQUIRE_BPF=1).
public enum TestSupport {
    /// The repository root (this file is Sources/TapioTestSupport/TestSupport.swift).
    public static let packageRoot: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    }()

    /// Where `swift build` put the programs: beside the test bundle.
    public static let productsDirectory: String = {
        var url = URL(fileURLWithPath: CommandLine.arguments.first { $0.hasSuffix(".xctest") } ?? CommandLine.arguments[0])
        while url.pathExtension == "xctest" || url.lastPathComponent == "Contents" || url.lastPathComponent == "MacOS" {
            url.deleteLastPathComponent()
        }
        return url.path
    }()

    public static func product(_ name: String) throws -> String {
        let path = productsDirectory + "/" + name
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw TestSupportError("\(path) is missing: run `swift build` (make test does) before `swift test`")
        }
        return path
    }

    public static var bpfRequired: Bool { ProcessInfo.processInfo.environment["TAPIO_REQUIRE_BPF"] == "1" }

    /// Why BPF tests cannot run here, nil when they can.
    public static func bpfUnavailableReason() -> String? {
        if geteuid() != 0 { return "not root" }
        if !FileManager.default.fileExists(atPath: "/sys/kernel/btf/vmlinux") { return "no kernel BTF at /sys/kernel/btf/vmlinux" }
        return nil
    }

    /// Skips (or, with TAPIO_REQUIRE_BPF=1, fails) a test that needs root and BPF.
    public static func requireBPF(file: StaticString = #filePath, line: UInt = #line) throws {
        guard let reason = bpfUnavailableReason() else { return }
        if bpfRequired {
            throw TestSupportError("TAPIO_REQUIRE_BPF=1 but BPF tests cannot run: \(reason)")
        }
        throw XCTSkip("needs root and a BPF-capable kernel: \(reason)")
    }

    public static func temporaryDirectory(_ prefix: String = "tapio-test") throws -> String {
        let template = NSTemporaryDirectory() + "/\(prefix).XXXXXX"
        var bytes = Array(template.utf8CString)
        guard mkdtemp(&bytes) != nil else { throw TestSupportError("mkdtemp failed") }
        return String(cString: bytes)
    }

    /// A development PKI with the given nodes and operators.
    public static func makePKI(in dir: String, nodes: [String], operators: [String] = ["alice"]) throws -> String {
        let pki = dir + "/pki"
        _ = try DevelopmentPKI.initialize(directory: pki, nodes: nodes, operators: operators)
        return pki
    }

    /// A TCP port that was free a moment ago on 127.0.0.1.
    public static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    /// Runs a program to completion.
    @discardableResult
    public static func run(_ path: String, _ arguments: [String], timeout: TimeInterval = 60) throws -> (status: Int32, stdout: String, stderr: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        // Files, not pipes: a chatty child can never stall on a full pipe.
        let dir = try temporaryDirectory("tapio-run")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        _ = FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/out"))
        let err = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/err"))
        defer { try? out.close(); try? err.close() }
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let deadline = Date(timeIntervalSinceNow: timeout)
        while p.isRunning, Date() < deadline { usleep(10_000) }
        if p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            throw TestSupportError("\(path) \(arguments.joined(separator: " ")) did not finish within \(timeout) s")
        }
        p.waitUntilExit()
        let outData = FileManager.default.contents(atPath: dir + "/out") ?? Data()
        let errData = FileManager.default.contents(atPath: dir + "/err") ?? Data()
        return (p.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
    }

    /// Debian's python3 with python3-protobuf (not a virtualenv's).
    public static let systemPython = "/usr/bin/python3"

    /// Python modules generated by protoc from proto/tapio.proto into a fresh directory.
    public static func pythonProtobufModules() throws -> String {
        let dir = try temporaryDirectory("tapio-pb")
        let r = try run("/usr/bin/protoc", ["--proto_path=\(packageRoot)/proto", "--python_out=\(dir)", "\(packageRoot)/proto/tapio.proto"])
        guard r.status == 0 else { throw TestSupportError("protoc failed: \(r.stderr)") }
        return dir
    }

    public static var interopScript: String { packageRoot + "/Tests/interop/tapio_peer.py" }
}

public struct TestSupportError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A long-running program started by a test, with its output in a file; killed
/// (SIGKILL) if the test forgets to stop it.
///
/// Spawned with posix_spawn and reaped with waitpid, not Foundation's Process:
/// Foundation decides a child has exited when a pipe it shares closes, and a
/// daemon such as dnsmasq closes every inherited descriptor at start, which
/// leaves Foundation blocked in waitpid and every later Process stuck.
public final class ChildProcess: @unchecked Sendable {
    public let pid: pid_t
    public let logPath: String
    private var exitStatus: Int32?

    public init(_ path: String, _ arguments: [String], logPath: String) throws {
        self.logPath = logPath
        let fd = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TestSupportError("cannot create \(logPath)") }
        defer { close(fd) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fd, 1)
        posix_spawn_file_actions_adddup2(&actions, fd, 2)
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, path, &actions, nil, argv, environ)
        guard rc == 0 else { throw TestSupportError("cannot start \(path): \(String(cString: strerror(rc)))") }
        pid = child
    }

    deinit {
        if isRunning { kill(pid, SIGKILL); _ = reap(block: true) }
    }

    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    public var isRunning: Bool { reap(block: false) == nil }

    /// The wait status once the child has exited (reaping it), nil while it runs.
    private func reap(block: Bool) -> Int32? {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        let r = waitpid(pid, &status, block ? 0 : WNOHANG)
        guard r == pid else { return nil }
        // Exit code, or 128 + signal like a shell.
        let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        exitStatus = code
        return code
    }

    /// Sends `signal` and waits up to `timeout` seconds for the exit; SIGKILL after
    /// that. Returns the exit code (128 + signal when killed).
    @discardableResult
    public func stop(signal: Int32 = SIGTERM, timeout: TimeInterval = 15) -> Int32 {
        if let done = reap(block: false) { return done }
        kill(pid, signal)
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            if let done = reap(block: false) { return done }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        return reap(block: true) ?? -1
    }
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
public func eventually(timeout: TimeInterval = 20, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date(timeIntervalSinceNow: timeout)
    while Date() < deadline {
        if try condition() { return true }
        usleep(50_000)
    }
    return try condition()
}

extension TestSupport {
    /// A plain HTTP/1.1 GET on 127.0.0.1 (for /metrics and /healthz); the response body.
    public static func httpGet(port: Int, path: String) throws -> (status: Int, body: String) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket failed") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw TestSupportError("connect to 127.0.0.1:\(port) failed") }
        let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response += buffer[0..<n]
        }
        let text = String(decoding: response, as: UTF8.self)
        let status = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
        let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        return (status, body)
    }
}
