// tests/header_hygiene/two_tus_main.cu: one of two translation units that include kvq.cuh (see
// two_tus.hpp); it links with two_tus_other.cu into one program, which runs without a GPU.
#include "two_tus.hpp"

#include <cstdio>

int use_kvq_in_main_tu() { return two_tus::exercise_kvq(); }

int main() {
  const int failures = use_kvq_in_main_tu() + use_kvq_in_other_tu();
  std::printf("two translation units including kvq.cuh linked into one program; %d failed expectations\n",
              failures);
  return failures == 0 ? 0 : 1;
}
