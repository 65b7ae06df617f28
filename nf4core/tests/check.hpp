// A minimal test harness: CHECK records a failure and keeps going; main()
// returns non-zero if anything failed, which is what `meson test` reads.
#ifndef NF4CORE_TESTS_CHECK_HPP
#define NF4CORE_TESTS_CHECK_HPP

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace check {

inline int &failures() {
    static int n = 0;
    return n;
}

struct Case {
    const char *name;
    std::function<void()> fn;
};

inline std::vector<Case> &cases() {
    static std::vector<Case> v;
    return v;
}

struct Register {
    Register(const char *name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

inline int run_all() {
    for (const Case &c : cases()) {
        const int before = failures();
        c.fn();
        std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", c.name);
    }
    std::printf("%zu cases, %d failed checks\n", cases().size(), failures());
    return failures() == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)
#define TEST_CASE(name)                                                              \
    static void name();                                                              \
    static check::Register CHECK_CAT(register_, name)(#name, name);                 \
    static void name()

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            ++check::failures();                                                     \
            std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                         \
    do {                                                                             \
        if (!(cond)) {                                                               \
            ++check::failures();                                                     \
            std::printf("  %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);  \
            std::printf(__VA_ARGS__);                                                \
            std::printf("\n");                                                       \
        }                                                                            \
    } while (0)

#endif  // NF4CORE_TESTS_CHECK_HPP
