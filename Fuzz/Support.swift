// Shared by every fuzz target (compiled into each by Fuzz/build.sh).
import TapioWire

/// A failed check ends the run with its message (kept in optimized builds,
/// unlike precondition's), which libFuzzer reports as a crash.
func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError(message()) }
}

/// The bytes libFuzzer hands over, as an array.
func bytes(_ data: UnsafePointer<UInt8>, _ size: Int) -> [UInt8] {
    Array(UnsafeBufferPointer(start: data, count: size))
}

/// JSON equality as a reader sees it: a number is the same number whether it
/// was held as an integer or a double (`0.0` reads back as the integer 0).
func jsonEquivalent(_ a: JSONValue, _ b: JSONValue) -> Bool {
    switch (a, b) {
    case (.int(let x), .double(let y)), (.double(let y), .int(let x)):
        return Double(x) == y
    case (.array(let x), .array(let y)):
        return x.count == y.count && zip(x, y).allSatisfy { jsonEquivalent($0, $1) }
    case (.object(let x), .object(let y)):
        return x.count == y.count && x.allSatisfy { key, value in y[key].map { jsonEquivalent(value, $0) } ?? false }
    default:
        return a == b
    }
}
