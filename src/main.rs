fn main() {
    std::process::exit(cachelock::cli::main());
}
