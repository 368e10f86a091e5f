package main

import (
	"math"
	"testing"
)

// moments returns the sample mean and variance of n draws, by Welford's update: the textbook
// E[x^2] - E[x]^2 cancels catastrophically for Beta(1e6, 1), whose variance is 1e-12 around a mean near 1.
func moments(n int, draw func() float64) (mean, variance float64) {
	var m2 float64
	for i := 1; i <= n; i++ {
		x := draw()
		delta := x - mean
		mean += delta / float64(i)
		m2 += delta * (x - mean)
	}
	return mean, m2 / float64(n)
}

func TestNormalMomentsAndTail(t *testing.T) {
	var r rng
	r.seed(1)
	const n = 2_000_000
	tail := 0
	mean, variance := moments(n, func() float64 {
		x := r.normal()
		if math.Abs(x) > zigR {
			tail++
		}
		return x
	})
	// Standard errors: mean 1/sqrt(n) = 7e-4, variance sqrt(2/n) = 1e-3; allow five.
	if math.Abs(mean) > 3.5e-3 || math.Abs(variance-1) > 5e-3 {
		t.Fatalf("normal: mean %g, variance %g", mean, variance)
	}
	// P(|Z| > 3.4426) = 5.76e-4: 1152 expected, standard deviation 34. The tail branch must be exercised.
	if want := 5.76e-4 * n; math.Abs(float64(tail)-want) > 5*math.Sqrt(want) {
		t.Fatalf("normal tail: %d draws beyond %g, want about %.0f", tail, zigR, want)
	}
}

func TestBetaMoments(t *testing.T) {
	cases := []struct{ a, b float64 }{
		{1, 1},         // the prior for unknown candidates
		{2, 41},        // a fresh click-through posterior
		{2000, 45000},  // the largest shapes the workload draws
		{0.5, 0.5},     // both below 1: the logarithm path
		{0.3, 4},       // one below 1
		{1e6, 1},       // test table's "strong" row
		{0.001, 0.002}, // both draws underflow in the plain ratio
		{0.2, 1},       // the boosted draw next to a shape of exactly 1
	}
	const n = 400_000
	var r rng
	r.seed(7)
	for _, c := range cases {
		wantMean := c.a / (c.a + c.b)
		wantVar := c.a * c.b / ((c.a + c.b) * (c.a + c.b) * (c.a + c.b + 1))
		nan := false
		mean, variance := moments(n, func() float64 {
			x := r.beta(c.a, c.b)
			if !(x >= 0 && x <= 1) {
				nan = true
			}
			return x
		})
		if nan {
			t.Fatalf("Beta(%g, %g): a draw outside [0, 1]", c.a, c.b)
		}
		// Five standard errors of the mean, and 5% of the variance (its standard error is below 1% here).
		if se := math.Sqrt(wantVar / n); math.Abs(mean-wantMean) > 5*se+1e-12 {
			t.Errorf("Beta(%g, %g): mean %g, want %g (se %g)", c.a, c.b, mean, wantMean, se)
		}
		if math.Abs(variance-wantVar) > 0.05*wantVar+1e-15 {
			t.Errorf("Beta(%g, %g): variance %g, want %g", c.a, c.b, variance, wantVar)
		}
	}
}

func TestSeedReproduces(t *testing.T) {
	var a, b rng
	a.seed(42)
	b.seed(42)
	for i := 0; i < 1000; i++ {
		if x, y := a.beta(3, 50), b.beta(3, 50); x != y {
			t.Fatalf("draw %d: %g != %g", i, x, y)
		}
	}
	b.seed(43)
	if a.next() == b.next() {
		t.Fatal("seeds 42 and 43 start the same stream")
	}
}

func BenchmarkBeta(b *testing.B) {
	var r rng
	r.seed(1)
	sink := 0.0
	for i := 0; i < b.N; i++ {
		sink += r.beta(1000, 21000)
	}
	if sink < 0 {
		b.Fatal(sink)
	}
}
