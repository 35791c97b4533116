fn main() {
    std::process::exit(scap::cli::main());
}
