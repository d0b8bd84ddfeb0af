//! The AFL++ driver: `kollava-fuzz TARGET` feeds each input AFL++ generates to the target.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = kollava_fuzz::target(&name) else {
        let names: Vec<&str> = kollava_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
        eprintln!("usage: kollava-fuzz TARGET ({})", names.join(", "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| target(data));
}
