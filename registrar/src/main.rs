//! The registrar: Docker Engine events in, Consul agent registrations out. Its implementation is
//! tracked in its own issue; until then this binary only states so and exits non-zero, so that no
//! deployment mistakes it for a working registrar.

fn main() {
    eprintln!("registrar: not implemented yet (see the registrar issue)");
    std::process::exit(2);
}
