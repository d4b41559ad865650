//! web-sample: the demo backend. Its implementation is tracked in the stack issue; until then this
//! binary only states so and exits non-zero.

fn main() {
    eprintln!("web-sample: not implemented yet (see the stack issue)");
    std::process::exit(2);
}
