// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-console against a real HTTP server started by the test, serving JSON recorded from
// the demo's gateway (tests/data/gateway-status.json) and a transfer service's job list
// (tests/data/transfer-jobs.json). Runs headless (QT_QPA_PLATFORM=offscreen).
#include <httplib.h>

#include <gst/gst.h>

#include <QFile>
#include <QJsonDocument>
#include <QLabel>
#include <QPushButton>
#include <QSettings>
#include <QSignalSpy>
#include <QTemporaryDir>
#include <QtTest>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "main_window.hpp"
#include "otpgate/gateway.hpp"
#include "test_pki.hpp"

using otpgate::console::MainWindow;
using otpgate::console::ServicePoller;

namespace {

std::string read(const char* name) {
  std::ifstream in(std::string(OTPGATE_TEST_DATA) + "/" + name);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A status server that serves the recorded documents and records every request.
class RecordedService {
 public:
  // Serves `status` instead of the recording when set (before start).
  std::string status;
  void start(int port = 0) {
    server_ = std::make_unique<httplib::Server>();
    server_->Get("/api/v1/status", [this](const httplib::Request& req, httplib::Response& res) {
      {
        std::lock_guard lock(mutex_);
        authorization_ = QString::fromStdString(req.get_header_value("Authorization"));
      }
      res.set_content(status.empty() ? read("gateway-status.json") : status, "application/json");
    });
    server_->Get("/api/v1/jobs", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(read("transfer-jobs.json"), "application/json");
    });
    auto record = [this](const httplib::Request& req, httplib::Response& res) {
      std::lock_guard lock(mutex_);
      requests_.push_back(req.method + " " + req.path + " " + req.get_header_value("Content-Type"));
      res.set_content("{}", "application/json");
    };
    server_->Post(R"(/api/v1/jobs/.*)", record);
    server_->Delete(R"(/api/v1/jobs/.*)", record);
    port_ = port == 0 ? server_->bind_to_any_port("127.0.0.1")
                      : (server_->bind_to_port("127.0.0.1", port) ? port : -1);
    QVERIFY(port_ > 0);
    thread_ = std::thread([this] { server_->listen_after_bind(); });
  }
  void stop() {
    server_->stop();
    if (thread_.joinable()) thread_.join();
  }
  ~RecordedService() { stop(); }
  QUrl url() const { return QUrl(QString("http://127.0.0.1:%1").arg(port_)); }
  int port() const { return port_; }
  QString authorization() {
    std::lock_guard lock(mutex_);
    return authorization_;
  }
  std::vector<std::string> requests() {
    std::lock_guard lock(mutex_);
    return requests_;
  }

 private:
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
  std::mutex mutex_;
  std::vector<std::string> requests_;
  QString authorization_;
};

// Every field of `recorded` (objects, recursively; arrays by their first element) is in
// `live`: the recorded documents the other tests use have not drifted from what a gateway
// serves. Returns the first missing path, or "".
std::string missing_field(const nlohmann::json& recorded, const nlohmann::json& live,
                          const std::string& path = "") {
  if (recorded.is_object()) {
    if (!live.is_object()) return path + " (not an object)";
    for (const auto& [key, value] : recorded.items()) {
      if (!live.contains(key)) return path + "/" + key;
      if (auto m = missing_field(value, live[key], path + "/" + key); !m.empty()) return m;
    }
  } else if (recorded.is_array() && !recorded.empty() && live.is_array() && !live.empty()) {
    return missing_field(recorded[0], live[0], path + "/0");
  }
  return "";
}

int row_of_job(MainWindow& w, const QString& id) {
  for (int r = 0; r < w.jobs().rowCount(); ++r)
    if (w.jobs().job_at(r).value("job_id").toString() == id) return r;
  return -1;
}

}  // namespace

class ConsoleTest : public QObject {
  Q_OBJECT
 private slots:
  void modelsHoldTheServedValues() {
    RecordedService gateway, transfer;
    gateway.start();
    transfer.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    w.add_service(ServicePoller::Kind::transfer, transfer.url(), 100);
    QTRY_COMPARE(w.key_supplies().rowCount(), 20);  // 20 streams, one direction each at site A
    QTRY_COMPARE(w.jobs().rowCount(), 3);
    // The supply of p1-video (send) reports what the gateway served.
    bool found = false;
    for (const auto& r : w.key_supplies().rows()) {
      if (r.stream == "p1-video" && r.direction == "send") {
        QCOMPARE(r.ready_bytes, 452210.0);
        QCOMPARE(r.capacity_bytes, 524288.0);
        QCOMPARE(r.site, QString("hospital-a"));
        QCOMPARE(r.mode, QString("OTP"));
        QVERIFY(r.kme_healthy);
        found = true;
      }
    }
    QVERIFY(found);
    QCOMPARE(w.streams().rowCount(), 20);
    const int failed = row_of_job(w, "J20261124-8c9d0e1f");
    QVERIFY(failed >= 0);
    QCOMPARE(w.jobs()
                 .data(w.jobs().index(failed, otpgate::console::JobModel::method), Qt::DisplayRole)
                 .toString(),
             QString("AES"));
    const int running = row_of_job(w, "J20261124-4e5f6a7b");
    QCOMPARE(
        w.jobs()
            .data(w.jobs().index(running, otpgate::console::JobModel::progress), Qt::DisplayRole)
            .toString(),
        QString("50%"));
    // Alerts: the failed transfer, and the link's key below the forecast horizon (not a
    // stream's own small ring: the recording's 20 rings hold 14-30 s each and raise nothing).
    QTRY_VERIFY(
        w.alerts().stringList().join("\n").contains("J20261124-8c9d0e1f (specimen S-0044) failed"));
    QTRY_COMPARE(w.links().rowCount(), 1);
    QVERIFY(w.alerts().stringList().join("\n").contains("less than the 65-minute horizon"));
    for (const auto& line : w.alerts().stringList())
      QVERIFY2(!line.contains("p1-video"), qPrintable(line));
  }

  void unitsAreHumanAndLocaleAware() {
    using namespace otpgate::console;
    QLocale::setDefault(QLocale(QLocale::English, QLocale::UnitedStates));
    QCOMPARE(human_rate(7444429), QString("7.44 Mbit/s"));  // the issue's raw axis value
    QCOMPARE(human_rate(3722214), QString("3.72 Mbit/s"));
    QCOMPARE(human_rate(250873.3), QString("251 kbit/s"));
    QCOMPARE(human_rate(12500), QString("12.5 kbit/s"));
    QCOMPARE(human_rate(2e6, RateUnit{1e6, "Mbit/s"}), QString("2 Mbit/s"));
    QCOMPARE(human_rate(0), QString("0 bit/s"));
    QCOMPARE(human_bytes(3.1e9), QString("3.1 GB"));
    QCOMPARE(human_duration(3.1e9 * 8 / 10e6), QString("41 min"));  // 3.1 GB at 10 Mbit/s
    QCOMPARE(human_duration(42), QString("42 s"));
    QCOMPARE(human_duration(3 * 3600 + 5 * 60), QString("3 h 5 min"));
    QCOMPARE(tick_step(1.43e6), 5e5);
    QLocale::setDefault(QLocale(QLocale::German, QLocale::Germany));
    QCOMPARE(human_rate(7444429), QString("7,44 Mbit/s"));
    QCOMPARE(human_bytes(3.1e9), QString("3,1 GB"));
    QLocale::setDefault(QLocale(QLocale::English, QLocale::UnitedStates));
  }

  void aLinksForecastIsShownAsTextWithItsAlertAndTheAxisInHumanUnits() {
    // The recording's link: 30 MB held, 1.3 Mbit/s used, 0.5 Mbit/s refilled, as the
    // gateway computed it (300 s left; a 65-minute panel short by 360 MB).
    QLocale::setDefault(QLocale(QLocale::English, QLocale::UnitedStates));
    RecordedService gateway;
    gateway.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    QTRY_COMPARE(w.links().rowCount(), 1);
    using L = otpgate::console::LinkModel;
    auto cell = [&](int column) {
      return w.links().data(w.links().index(0, column), Qt::DisplayRole).toString();
    };
    QCOMPARE(cell(L::peer), QString("sae-b"));
    QCOMPARE(cell(L::held), QString("30.0 MB"));
    QCOMPARE(cell(L::refill), QString("500 kbit/s"));
    QCOMPARE(cell(L::consumption), QString("1.3 Mbit/s"));
    QCOMPARE(cell(L::lasts), QString("at the current rate the key lasts 5 min"));
    QCOMPARE(cell(L::panel), QString("a 65-minute panel needs 633.8 MB: short by 360.0 MB"));
    QVERIFY(w.links().data(w.links().index(0, L::lasts), Qt::BackgroundRole).isValid());
    QTRY_VERIFY(w.alerts().stringList().join("\n").contains(
        "hospital-a: send link to sae-b: at the current rate its key lasts 5 min, less than the "
        "65-minute horizon (the QKD link makes less key than is used"));
    // The chart's rate axis: round ticks in one human unit, never raw bit/s.
    QTRY_COMPARE(w.rate_axis()->categoriesLabels(),
                 QStringList({"0 Mbit/s", "0.5 Mbit/s", "1 Mbit/s", "1.5 Mbit/s"}));
    QCOMPARE(w.time_axis()->categoriesLabels().last(), QString("now"));
  }

  void aReceivingLinkSaysItFetchesKeysAsAnnounced() {
    auto status = nlohmann::json::parse(read("gateway-status.json"));
    auto receive = status["links"][0];
    receive["direction"] = "receive";
    receive["held_bytes"] = 0;
    receive["ring_bytes"] = 0;
    status["links"].push_back(receive);
    RecordedService gateway;
    gateway.status = status.dump();
    gateway.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    QTRY_COMPARE(w.links().rowCount(), 2);
    using L = otpgate::console::LinkModel;
    for (int row = 0; row < 2; ++row) {
      const auto direction =
          w.links().data(w.links().index(row, L::direction), Qt::DisplayRole).toString();
      const auto held = w.links().data(w.links().index(row, L::held), Qt::DisplayRole).toString();
      // A slave holds no key ahead: "0 B" would read as a shortage.
      QCOMPARE(held, direction == "receive" ? QString("fetched as announced") : QString("30.0 MB"));
    }
  }

  void alertsSayWhatHappenedWhereWithAHint() {
    auto status = nlohmann::json::parse(read("gateway-status.json"));
    auto& link = status["links"][0];
    link["kme_healthy"] = false;
    link["kme_last_error"] = "KME enc_keys: HTTP 503: no key";
    link["aes_fallback_streams"] = 3;
    link["seconds_left"] = nullptr;
    status["key_wiped_at_stop_bytes"] = 262144;
    status["streams"][0]["send"]["replays"] = 4;
    status["streams"][0]["receive"]["drops-cipher"] = 7;
    status["health"] = {{"status", "unhealthy"},
                        {"reasons", {"stream p1-video: no key for 16 s; its media is dropped"}},
                        {"warnings", nlohmann::json::array()}};
    RecordedService gateway;
    gateway.status = status.dump();
    gateway.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    QTRY_COMPARE(w.links().rowCount(), 1);
    QTRY_COMPARE(w.alerts().rowCount(), 6);
    const QString all = w.alerts().stringList().join("\n");
    for (const char* expected :
         {"hospital-a: send link to sae-b: KME unhealthy: KME enc_keys: HTTP 503: no key (check "
          "the KME",
          "hospital-a: send link to sae-b: AES fallback engaged on 3 of 20 streams (key ran out",
          "hospital-a: p1-video send: 4 new replays (dropped, never delivered",
          "hospital-a: p1-video receive: 7 new AES packets refused (packets marked "
          "AES-256-GCM where this site allows the one-time pad only: the partner's policy "
          "differs from this site's, or they are forged",
          "hospital-a: 262.1 kB of fetched key was wiped unused when the gateway last stopped (",
          "hospital-a: gateway unhealthy: stream p1-video: no key for 16 s; its media is dropped "
          "(its /healthz answers 503"}) {
      QVERIFY2(all.contains(expected), qPrintable(all));
    }
    // The status bar says so too: the service answers, but is not "up".
    QTRY_VERIFY2(w.services_text().contains("UNHEALTHY"), qPrintable(w.services_text()));
    QVERIFY(!all.contains("horizon"));  // the link's key does not run out: no horizon alert
    // Each line starts with its time.
    for (const auto& line : w.alerts().stringList())
      QVERIFY2(QRegularExpression("^\\d\\d:\\d\\d:\\d\\d ").match(line).hasMatch(),
               qPrintable(line));
  }

  void aLiveGatewaysStatusFillsTheModels() {
    // A real gateway (one stream, both directions) on the KME simulator: what the console
    // shows comes from what the gateway serves today, not from a recording.
    g_setenv("GST_PLUGIN_PATH", OTPGATE_PLUGIN_DIR, TRUE);
    if (!gst_is_initialized()) gst_init(nullptr, nullptr);
    otpgate::kmesim::KmeSimulator kme(otpgate::testing::simulator_config());
    kme.start();
    QTemporaryDir dir;
    const std::string pki = otpgate::testing::pki_dir().string();
    const int base = 20000 + (::getpid() % 500) * 20;  // below the ephemeral range
    auto port = [&](int offset) { return std::to_string(base + offset); };
    const std::string toml =
        "[site]\nname = \"hospital-a\"\nsae_id = \"sae-a\"\nstate_dir = \"" +
        dir.path().toStdString() + "\"\n[kme]\nurl = \"" + kme.url() + "\"\ntls_cert = \"" + pki +
        "/sae-a.crt\"\ntls_key = \"" + pki + "/sae-a.key\"\ntls_ca = \"" + pki +
        "/ca.crt\"\n[peer]\nsae_id = \"sae-b\"\naddress = \"127.0.0.1\"\n[status]\nlisten = "
        "\"127.0.0.1:0\"\n[[stream]]\nname = \"p1-video\"\nlocal_rtp_port = " +
        port(0) + "\npeer_port = " + port(1) + "\nlisten_port = " + port(2) +
        "\ndeliver_rtp = \"127.0.0.1:" + port(3) + "\"\n";
    otpgate::gateway::Gateway gateway(otpgate::gateway::parse_config(toml, "live.toml"));
    gateway.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway,
                  QUrl(QString("http://127.0.0.1:%1").arg(gateway.status_port())), 100);
    QTRY_COMPARE(w.key_supplies().rowCount(), 2);
    QTRY_VERIFY(w.key_supplies().rows()[0].ready_bytes + w.key_supplies().rows()[1].ready_bytes >
                0);
    for (const auto& r : w.key_supplies().rows()) {
      QCOMPARE(r.site, QString("hospital-a"));
      QCOMPARE(r.stream, QString("p1-video"));
      QVERIFY2(r.kme_healthy, qPrintable(r.direction + ": " + r.kme_error));  // idle is healthy
      if (r.direction == "send") {
        QVERIFY(r.ready_bytes > 0);
        QVERIFY(r.capacity_bytes > 0);
      }
    }
    QCOMPARE(w.streams().rowCount(), 2);  // a row per direction
    // The link forecast the gateway publishes: a row per direction; sending, the KME's
    // store (the simulator's sane status) is counted in with the rings.
    QTRY_COMPARE(w.links().rowCount(), 2);
    QTRY_VERIFY(w.links().rows()[1].kme_trusted);
    for (const auto& l : w.links().rows()) {
      QCOMPARE(l.stream, QString("sae-b"));
      QCOMPARE(l.streams, 1);
      if (l.direction == "send") QVERIFY(l.held_bytes >= l.ring_bytes + l.kme_bytes - 1);
    }
    // Monitoring gets the same numbers.
    httplib::Client status_client("127.0.0.1", gateway.status_port());
    const auto metrics = status_client.Get("/metrics");
    QVERIFY(metrics && metrics->status == 200);
    QVERIFY2(metrics->body.find("otpgate_link_key_held_bytes{site=\"hospital-a\",peer=\"sae-b\","
                                "direction=\"send\"}") != std::string::npos,
             metrics->body.c_str());
    // The recordings the other tests use have every field a live gateway still serves.
    const auto live = nlohmann::json::parse(gateway.status_json());
    const auto recorded = nlohmann::json::parse(read("gateway-status.json"));
    QCOMPARE(QString::fromStdString(missing_field(recorded, live)), QString());
    gateway.stop();
  }

  void aGatewaysCallsAreShownPerMediaAndLeaveWhenTheyEnd() {
    // A status document recorded from the demo's SIP profile (scripts/demo.sh --sip) while
    // its call ran: one call, audio and video. Then the same gateway without the call.
    auto document = nlohmann::json::parse(read("gateway-status-call.json"));
    auto& video = document["calls"][0]["media"][1];
    video["cipher"] = "aes";  // as a call moved to AES from QKD by admission shows it
    RecordedService gateway;
    gateway.status = document.dump();
    gateway.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    QTRY_COMPARE(w.calls().rowCount(), 2);
    using otpgate::console::CallModel;
    auto cell = [&](int row, int column) {
      return w.calls().data(w.calls().index(row, column), Qt::DisplayRole).toString();
    };
    const auto& audio = document["calls"][0]["media"][0];
    QCOMPARE(cell(0, CallModel::site), QString("sae-a-site"));
    QCOMPARE(cell(0, CallModel::call),
             QString::fromStdString(document["calls"][0]["call_id"].get<std::string>()));
    QCOMPARE(cell(0, CallModel::media), QString("0 audio"));
    QCOMPARE(cell(1, CallModel::media), QString("1 video"));
    QCOMPARE(cell(0, CallModel::state), QString("answered"));
    QCOMPARE(cell(0, CallModel::endpoint),
             QString::fromStdString(audio["endpoint"].get<std::string>()));
    QCOMPARE(cell(0, CallModel::lanes), QString("0 / 0"));
    QCOMPARE(cell(1, CallModel::lanes), QString("1 / 1"));
    QCOMPARE(w.calls().data(w.calls().index(0, CallModel::sent), Qt::DisplayRole).toULongLong(),
             audio["packets"]["to_peer"].get<qulonglong>());
    QCOMPARE(w.calls().data(w.calls().index(0, CallModel::received), Qt::DisplayRole).toULongLong(),
             audio["packets"]["to_local"].get<qulonglong>());
    QCOMPARE(w.calls().data(w.calls().index(0, CallModel::key_used), Qt::UserRole).toULongLong(),
             audio["key_used_bytes"]["send"].get<qulonglong>() +
                 audio["key_used_bytes"]["receive"].get<qulonglong>());
    QVERIFY2(cell(0, CallModel::key_used).contains(" sent, "), qPrintable(cell(0, 8)));
    QCOMPARE(cell(0, CallModel::protection), QString("OTP"));
    QCOMPARE(cell(1, CallModel::protection), QString("AES"));
    QVERIFY(
        !w.calls().data(w.calls().index(0, CallModel::protection), Qt::BackgroundRole).isValid());
    QVERIFY(
        w.calls().data(w.calls().index(1, CallModel::protection), Qt::BackgroundRole).isValid());
    QVERIFY(!cell(0, CallModel::duration).isEmpty() && cell(0, CallModel::duration) != "-");
    // The call ends: the next poll no longer has it, and its rows leave.
    const int port = gateway.port();
    gateway.stop();
    document["calls"] = nlohmann::json::array();
    RecordedService after;
    after.status = document.dump();
    after.start(port);
    QTRY_COMPARE(w.calls().rowCount(), 0);
    QCOMPARE(w.streams().rowCount(), 4);  // the recorded streams stay (two, both directions)
  }

  void actionButtonsSendTheRightRequests() {
    RecordedService transfer;
    transfer.start();
    MainWindow w;
    w.confirm_deletes = false;
    w.add_service(ServicePoller::Kind::transfer, transfer.url(), 100);
    QTRY_COMPARE(w.jobs().rowCount(), 3);
    // The operator's selection survives the polls that follow it (three replies applied
    // to the table, counted, rather than a pause that a slow machine may fill with none).
    QSignalSpy polls(w.services().front(), &ServicePoller::updated);
    w.job_view()->selectRow(row_of_job(w, "J20261124-4e5f6a7b"));
    QTRY_VERIFY_WITH_TIMEOUT(polls.count() >= 3, 20000);
    QVERIFY(w.job_view()->selectionModel()->isRowSelected(row_of_job(w, "J20261124-4e5f6a7b"), {}));
    w.abort_button()->click();
    QTRY_COMPARE(transfer.requests().size(), std::size_t(1));
    QCOMPARE(transfer.requests()[0],
             std::string("POST /api/v1/jobs/J20261124-4e5f6a7b/abort application/json"));
    QTRY_COMPARE(w.jobs().rowCount(), 3);
    w.job_view()->selectRow(row_of_job(w, "J20261124-8c9d0e1f"));
    w.start_button()->click();
    QTRY_COMPARE(transfer.requests().size(), std::size_t(2));
    QCOMPARE(transfer.requests()[1],
             std::string("POST /api/v1/jobs/J20261124-8c9d0e1f/start application/json"));
    QTRY_COMPARE(w.jobs().rowCount(), 3);
    w.job_view()->selectRow(row_of_job(w, "J20261124-0a1b2c3d"));
    w.delete_button()->click();
    QTRY_COMPARE(transfer.requests().size(), std::size_t(3));
    QCOMPARE(transfer.requests()[2], std::string("DELETE /api/v1/jobs/J20261124-0a1b2c3d "));
  }

  void aServiceThatGoesAwayIsShownDownAndComesBack() {
    RecordedService gateway;
    gateway.start();
    const int port = gateway.port();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 100);
    ServicePoller* service = w.services().front();
    QTRY_VERIFY(service->up());
    gateway.stop();
    QTRY_VERIFY(!service->up());
    QTRY_VERIFY(w.alerts().stringList().join("\n").contains("is down"));
    RecordedService again;
    again.start(port);
    QTRY_VERIFY_WITH_TIMEOUT(service->up(), 10000);
    QVERIFY(!w.alerts().active().contains("down:" + service->base().toString()));
  }

  void aFirstStartAsksForServicesAndRemembersThem() {
    // An empty settings file, as on a first start from the desktop menu: no exit, no
    // terminal message, but the window with the services dialog over it.
    QTemporaryDir dir;
    QSettings settings(dir.filePath("otp-console.conf"), QSettings::IniFormat);
    RecordedService gateway;
    gateway.start();
    MainWindow w;
    w.show();
    w.start_from(&settings, 100);
    QTRY_VERIFY(w.services_dialog() && w.services_dialog()->isVisible());
    QVERIFY(w.services().empty());
    auto* dialog = w.services_dialog();
    dialog->add_row({ServicePoller::Kind::gateway, gateway.url(), "it", "secret"});
    dialog->test_connection();
    QTRY_VERIFY2(dialog->test_result()->text().contains("answers: gateway hospital-a"),
                 qPrintable(dialog->test_result()->text()));
    dialog->accept();
    QTRY_VERIFY(!w.services_dialog());
    QCOMPARE(w.services().size(), std::size_t(1));
    QTRY_COMPARE(w.links().rowCount(), 1);  // polling, with the credentials it was given
    QVERIFY(gateway.authorization().startsWith("Basic "));
    // Remembered: the next start goes straight to the service, no dialog.
    const auto remembered = otpgate::console::load_services(settings);
    QCOMPARE(remembered.size(), 1);
    QCOMPARE(remembered[0].url, gateway.url());
    QCOMPARE(remembered[0].user, QString("it"));
    QVERIFY(!(QFile::permissions(settings.fileName()) & QFile::ReadOther));
    MainWindow again;
    again.start_from(&settings, 100);
    QVERIFY(!again.services_dialog());
    QTRY_COMPARE(again.links().rowCount(), 1);
    // A URL that is not one is refused in the dialog, not at the next start.
    again.edit_services();
    again.services_dialog()->add_row({ServicePoller::Kind::transfer, QUrl("ftp://x"), {}, {}});
    again.services_dialog()->accept();
    QVERIFY(again.services_dialog()->isVisible());
    QVERIFY(again.services_dialog()->test_result()->text().contains("not a service URL"));
  }

  void anUnreachableServiceIsShownDownWithoutBlocking() {
    MainWindow w;
    // Nothing listens there (a port from the discard range, closed on test hosts).
    w.add_service(ServicePoller::Kind::gateway, QUrl("http://127.0.0.1:9"), 100);
    QTRY_VERIFY(w.alerts().stringList().join("\n").contains("is down"));
    QVERIFY(!w.services().front()->up());
  }

  void screenshotOfTheMainWindowWithData() {
    RecordedService gateway, transfer;
    gateway.start();
    transfer.start();
    MainWindow w;
    w.add_service(ServicePoller::Kind::gateway, gateway.url(), 200);
    w.add_service(ServicePoller::Kind::transfer, transfer.url(), 200);
    w.show();
    QSignalSpy polls(w.services().front(), &ServicePoller::updated);
    QTRY_COMPARE(w.key_supplies().rowCount(), 20);
    QTRY_COMPARE(w.jobs().rowCount(), 3);
    QTRY_VERIFY_WITH_TIMEOUT(polls.count() >= 6, 20000);  // a few chart points
    const QString path = QString(OTPGATE_ARTIFACTS) + "/otp-console.png";
    QDir().mkpath(OTPGATE_ARTIFACTS);
    QVERIFY(w.grab().save(path));
    QVERIFY(QFileInfo(path).size() > 10000);
  }
};

QTEST_MAIN(ConsoleTest)
#include "test_console.moc"
