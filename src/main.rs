//! The `rankmesh` command: parses arguments and hands the work to the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
