// The stop before the job's end time (trainer/job_end.h), without a model:
// the decision against hand-computed times, the estimates the trainer feeds
// it, and reading the end time from the environment.
#include <cstdlib>

#include <gtest/gtest.h>

#include "trainer/job_end.h"
#include "util/error.h"

namespace loom {
namespace {

TEST(MustStopBeforeJobEnd, StopsOnlyWhenOneMoreStepASaveAndTheMarginNoLongerFit) {
  // 1000 s to the end; step 10 s, save 30 s, margin 60 s: 100 s needed.
  EXPECT_FALSE(must_stop_before_job_end(/*now=*/0, /*end_time=*/1000, 10, 30, 60));
  EXPECT_FALSE(must_stop_before_job_end(899.9, 1000, 10, 30, 60));
  EXPECT_TRUE(must_stop_before_job_end(900, 1000, 10, 30, 60));
  EXPECT_TRUE(must_stop_before_job_end(950, 1000, 10, 30, 60));
  // Past the end already: stop (whatever is left of the job is best spent saving).
  EXPECT_TRUE(must_stop_before_job_end(1200, 1000, 10, 30, 60));
  // A slow save moves the stop earlier than a fixed 300 s lead would.
  EXPECT_TRUE(must_stop_before_job_end(1000 - 500, 1000, 100, 350, 60));
}

TEST(MustStopBeforeJobEnd, WorksOnUnixSecondsWithoutLosingPrecision) {
  const double end = 1.9e9;  // 2030, in Unix seconds
  EXPECT_FALSE(must_stop_before_job_end(end - 3.5, end, 1.0, 1.0, 1.0));
  EXPECT_TRUE(must_stop_before_job_end(end - 2.5, end, 1.0, 1.0, 1.0));
}

TEST(JobEndWatch, UsesTheFirstIterationOnlyUntilASecondIsMeasuredThenTheSlowestAfterIt) {
  JobEndWatch watch(/*end_time=*/1000, /*margin_seconds=*/10);
  EXPECT_EQ(watch.step_seconds(), 0.0);
  EXPECT_EQ(watch.save_seconds(), 0.0);
  watch.record_iteration(50);  // the first step's warm-up
  EXPECT_EQ(watch.step_seconds(), 50.0);
  watch.record_iteration(2);
  EXPECT_EQ(watch.step_seconds(), 2.0);
  watch.record_iteration(7);  // a step with validation
  watch.record_iteration(3);
  EXPECT_EQ(watch.step_seconds(), 7.0);
  watch.record_save(20);
  watch.record_save(5);
  EXPECT_EQ(watch.save_seconds(), 20.0);
  // 7 + 20 + 10 = 37 s needed.
  EXPECT_FALSE(watch.stop_now(962.9));
  EXPECT_TRUE(watch.stop_now(963));
  EXPECT_EQ(watch.end_time(), 1000.0);
}

class JobEndEnvironment : public ::testing::Test {
 protected:
  void SetUp() override {
    ::unsetenv("LOOM_JOB_END_TIME");
    ::unsetenv("SLURM_JOB_END_TIME");
  }
  void TearDown() override { SetUp(); }
};

TEST_F(JobEndEnvironment, ReadsLoomsVariableFirstThenSlurmsAndNoneIsZero) {
  EXPECT_EQ(job_end_time_from_environment(), 0.0);
  ::setenv("SLURM_JOB_END_TIME", "1700000000", 1);
  EXPECT_EQ(job_end_time_from_environment(), 1700000000.0);
  ::setenv("LOOM_JOB_END_TIME", "1700000123.5", 1);
  EXPECT_EQ(job_end_time_from_environment(), 1700000123.5);
  // The batch script exports an empty value when squeue could not say.
  ::setenv("LOOM_JOB_END_TIME", "", 1);
  EXPECT_EQ(job_end_time_from_environment(), 1700000000.0);
}

TEST_F(JobEndEnvironment, RefusesAValueThatIsNotUnixSecondsNamingTheVariable) {
  for (const char* bad : {"2030-01-01T00:00:00", "12s", "-5", "0"}) {
    ::setenv("LOOM_JOB_END_TIME", bad, 1);
    try {
      job_end_time_from_environment();
      FAIL() << bad << " was accepted";
    } catch (const BadInput& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("LOOM_JOB_END_TIME=") + bad), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace loom
