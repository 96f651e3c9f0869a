// loom's entry point: parse the command line, run the subcommand, map errors
// to exit codes (0 done, 1 internal error, 2 bad input). See launch/commands.h.
#include "launch/commands.h"

int main(int argc, char** argv) { return loom::run_cli(argc, argv); }
