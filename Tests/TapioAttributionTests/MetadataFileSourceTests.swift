import Foundation
import TapioAttribution
import TapioTestSupport
import XCTest

final class MetadataFileSourceTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        dir = try TestSupport.temporaryDirectory("tapio-attr")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func testLoadsAPodListAndReloadsOnlyWhenTheFileChanges() throws {
        let path = dir + "/pods.json"
        try Fixtures.podListJSON().write(to: URL(fileURLWithPath: path))
        let index = PodIndex()
        let source = MetadataFileSource(path: path, index: index)
        XCTAssertTrue(try source.reloadIfChanged())
        XCTAssertEqual(index.count, 3)
        XCTAssertEqual(index.pod(containerId: Fixtures.oomContainer)?.pod.name, "elephant")
        XCTAssertFalse(try source.reloadIfChanged(), "unchanged file is not read again")
        XCTAssertEqual(source.reloads, 1)

        // Rewritten atomically (a new inode) without rabbit.
        let next = try Fixtures.podListJSON { $0.removeAll { $0.metadata?.name == "rabbit" } }
        try next.write(to: URL(fileURLWithPath: path), options: .atomic)
        XCTAssertTrue(try source.reloadIfChanged())
        XCTAssertEqual(index.count, 2)
        XCTAssertNil(index.pod(namespace: "default", name: "rabbit"))
        XCTAssertEqual(index.pod(uid: Fixtures.rabbitUID)?.name, "rabbit", "a deleted pod stays answerable for its retention")

        // Rewritten in place, same size: the mtime tells.
        var edited = try Fixtures.podListJSON { $0.removeAll { $0.metadata?.name == "rabbit" } }
        let from = Array("queue-l4dv8".utf8), to = Array("queue-zzzzz".utf8)
        if let r = edited.firstRange(of: from) { edited.replaceSubrange(r, with: to) }
        usleep(20_000)
        try edited.write(to: URL(fileURLWithPath: path))
        XCTAssertTrue(try source.reloadIfChanged())
        XCTAssertEqual(index.pod(uid: Fixtures.queueUID)?.name, "queue-zzzzz")
    }

    func testAHalfWrittenFileKeepsTheLastGoodContents() throws {
        let path = dir + "/pods.json"
        let full = try Fixtures.podListJSON()
        try full.write(to: URL(fileURLWithPath: path))
        let index = PodIndex()
        let source = MetadataFileSource(path: path, index: index)
        try source.reloadIfChanged()
        try full.prefix(full.count / 2).write(to: URL(fileURLWithPath: path))
        XCTAssertThrowsError(try source.reloadIfChanged())
        XCTAssertNotNil(source.lastError)
        XCTAssertEqual(index.count, 3)
        try full.write(to: URL(fileURLWithPath: path))
        XCTAssertTrue(try source.reloadIfChanged(), "retried once the writer is done")
        XCTAssertNil(source.lastError)
        try FileManager.default.removeItem(atPath: path)
        XCTAssertThrowsError(try source.reloadIfChanged())
        XCTAssertEqual(index.count, 3)
    }

    func testBackgroundPollingPicksUpChanges() throws {
        let path = dir + "/pods.json"
        try Fixtures.podListJSON { $0 = Array($0.prefix(1)) }.write(to: URL(fileURLWithPath: path))
        let index = PodIndex()
        let source = MetadataFileSource(path: path, index: index)
        source.start(interval: 0.05)
        defer { source.stop() }
        XCTAssertTrue(eventually(timeout: 10) { index.count == 1 })
        try Fixtures.podListJSON().write(to: URL(fileURLWithPath: path), options: .atomic)
        XCTAssertTrue(eventually(timeout: 10) { index.count == 3 })
    }

    func testASinglePodDocumentIsAccepted() throws {
        let path = dir + "/pod.json"
        try Fixtures.data("pod-k3s-containerd-crashloop.json").write(to: URL(fileURLWithPath: path))
        let index = PodIndex()
        try MetadataFileSource(path: path, index: index).reloadIfChanged()
        XCTAssertEqual(index.allPods.map(\.name), ["rabbit"])
    }
}
