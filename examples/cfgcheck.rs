fn main() {
    for p in std::env::args().skip(1) {
        match hookyard::config::load(std::path::Path::new(&p)) {
            Ok(s) => println!("OK {} rules", s.rules.len()),
            Err(e) => println!("{e}"),
        }
    }
}
