fn main() -> std::process::ExitCode {
    rankmesh::cli::main()
}
