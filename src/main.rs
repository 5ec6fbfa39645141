fn main() {
    if let Err(e) = tessera::cli::run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
