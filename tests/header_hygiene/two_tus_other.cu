// tests/header_hygiene/two_tus_other.cu: the second translation unit that includes kvq.cuh (see
// two_tus.hpp).
#include "two_tus.hpp"

int use_kvq_in_other_tu() { return two_tus::exercise_kvq(); }
