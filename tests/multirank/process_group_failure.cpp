// A two-rank job in which rank 1 fails to join rank 0's all_reduce, in one of
// three ways; tests/multirank/process_group_failure.sh checks that the whole
// job ends, non-zero, well within 30 s, with a message naming the rank and
// the operation (Note [process group contract] in parallel/process_group.h).
//
//   mpirun -np 2 process_group_failure MODE
//   absent: rank 1 never issues the all_reduce (it sleeps); rank 0's 2 s
//           timeout ends the job.
//   absent_recv: rank 1 never sends what rank 0 receives (a pipeline stage
//           that stopped); rank 0's 2 s timeout ends the job, naming the peer.
//   throws: rank 1's all_reduce is refused (a non-contiguous tensor); main
//           catches the exception and ends the job with MpiSession::abort.
//   killed: rank 1 is killed by SIGKILL; mpirun ends the job.
//   short:  rank 0 receives 12 floats, rank 1 sends 3: rank 0 ends the job.
//   long:   rank 1 sends 24 floats into rank 0's 12: rank 0 ends the job.
//   shape:  rank 1 sends float32 [3, 4] into rank 0's [4, 3] (same count).
//   dtype:  rank 1 sends int32 [12] into rank 0's float32 [12] (same bytes).
//           (Note [send signatures]: every mismatch is named on both sides.)
//   unwinds (4 ranks): rank 2 has a recv from rank 3 in flight that rank 3
//           never sends when an exception (a planted out-of-memory) unwinds
//           past it; ranks 0, 1 and 3 wait in an all_reduce. Rank 2 must end
//           the job at once with its own message (Note [abandoned works]),
//           not after waiting 120 s for its recv.
// In every mode but the absent ones, rank 0's timeout is 120 s, so only the failure
// path under test can end the job in time.
#include <ATen/ATen.h>

#include <csignal>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

#include "parallel/mpi_process_group.h"

int main(int argc, char** argv) {
  loom::MpiSession session(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode != "absent" && mode != "absent_recv" && mode != "throws" && mode != "killed" && mode != "short" &&
      mode != "long" && mode != "shape" && mode != "dtype" && mode != "unwinds") {
    if (session.world_rank() == 0) {
      std::fprintf(stderr,
                   "usage: process_group_failure absent|absent_recv|throws|killed|short|long|shape|dtype|unwinds\n");
    }
    return 2;
  }
  try {
    const bool absent = mode == "absent" || mode == "absent_recv";
    auto world = session.world(absent ? std::chrono::seconds(2) : std::chrono::seconds(120));
    if (mode == "absent_recv") {
      if (world->rank() == 1) {
        std::this_thread::sleep_for(std::chrono::seconds(100));
        return 0;
      }
      world->recv(at::zeros({12}), {.peer = 1, .tag = 5})->wait();
      std::fprintf(stderr, "rank 0: the recv completed, which it must not\n");
      return 0;
    }
    if (mode == "shape" || mode == "dtype") {
      if (world->rank() == 1) {
        world->send(mode == "shape" ? at::ones({3, 4}) : at::ones({12}, at::kInt), {.peer = 0, .tag = 7})->wait();
        std::this_thread::sleep_for(std::chrono::seconds(100));  // rank 0 must end the job
        return 0;
      }
      world->recv(mode == "shape" ? at::zeros({4, 3}) : at::zeros({12}), {.peer = 1, .tag = 7})->wait();
      std::fprintf(stderr, "rank 0: the recv completed, which it must not\n");
      return 0;
    }
    if (mode == "unwinds") {
      if (world->rank() == 2) {
        auto in_flight = world->recv(at::zeros({1 << 20}), {.peer = 3, .tag = 9});
        throw std::runtime_error("planted: rank 2 ran out of memory with a recv in flight");
      }
      world->all_reduce(at::ones({4}))->wait();
      std::fprintf(stderr, "rank %d: the all_reduce completed, which it must not\n", world->rank());
      return 0;
    }
    if (mode == "short" || mode == "long") {
      if (world->rank() == 1) {
        world->send(at::ones({mode == "short" ? 3 : 24}), {.peer = 0})->wait();
        std::this_thread::sleep_for(std::chrono::seconds(100));  // rank 0 must end the job
        return 0;
      }
      world->recv(at::zeros({12}), {.peer = 1})->wait();
      std::fprintf(stderr, "rank 0: the recv completed, which it must not\n");
      return 0;
    }
    at::Tensor t = at::ones({4, 3});
    if (world->rank() == 1) {
      if (mode == "absent") {
        std::this_thread::sleep_for(std::chrono::seconds(100));
        return 0;
      }
      if (mode == "killed") std::raise(SIGKILL);
      t = t.t();  // mode "throws": a transposed tensor is refused
    }
    world->all_reduce(t)->wait();
    std::fprintf(stderr, "rank %d: the all_reduce completed, which it must not\n", world->rank());
    return 0;
  } catch (const std::exception& e) {
    loom::MpiSession::abort(e.what());
  }
}
