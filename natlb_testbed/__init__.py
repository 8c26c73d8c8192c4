"""Development tooling around natlb, not part of the product: disposable
namespace networks (testbed), the peers that run in them (hosts) and the
self-contained demo.  natlb's runtime never imports this package; only the
`natlb demo` command loads it, on demand."""
