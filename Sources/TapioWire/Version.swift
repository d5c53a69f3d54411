/// The one version string of Tapio: `--version` of all three programs, the
/// agent's hello, the server's hello-ack, and the tags `make images` gives
/// the container images (the Makefile reads it from this line).
public enum TapioVersion {
    public static let current = "0.1.0"
}
