// stmux-handoff-bench --wait-on kernel: a one-thread kernel that holds its
// stream until a word in mapped host memory reaches a value, the way a
// stream-ordered call could wait for the daemon without a stream memory
// operation. It sleeps between reads so as to cost the memory system little.
extern "C" __global__ void stmux_spin_until(const volatile unsigned* word, unsigned value) {
  while (*word < value) __nanosleep(2000);
}
