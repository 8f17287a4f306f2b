// SPDX-License-Identifier: LGPL-2.1-or-later
// otp-console: the operator console's parts. Services (gateways, transfer services) are
// polled over HTTP without ever blocking the UI thread; their JSON feeds table models;
// rules over the models raise alerts. See qt-console/README in docs/console.md.
#pragma once

#include <QAbstractTableModel>
#include <QDateTime>
#include <QJsonArray>
#include <QJsonObject>
#include <QNetworkAccessManager>
#include <QNetworkRequest>
#include <QStringListModel>
#include <QTimer>
#include <QUrl>
#include <algorithm>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

namespace otpgate::console {

// A GET of a service's status (gateway) or job list (transfer), with its credentials.
QNetworkRequest service_request(int kind, const QUrl& base, const QString& user,
                                const QString& password, const QString& path = {});

// One service polled every second: a gateway (GET /api/v1/status) or a transfer service
// (GET /api/v1/jobs). A service that does not answer within two seconds is down; polling
// goes on, so it comes back by itself.
class ServicePoller : public QObject {
  Q_OBJECT
 public:
  enum class Kind { gateway, transfer };
  ServicePoller(Kind kind, QUrl base, QObject* parent = nullptr);
  Kind kind() const { return kind_; }
  // HTTP Basic credentials for a service that asks for a login (empty user: none).
  void set_credentials(const QString& user, const QString& password) {
    user_ = user;
    password_ = password;
  }
  QString user() const { return user_; }
  QString password() const { return password_; }
  QUrl base() const { return base_; }
  bool up() const { return up_; }
  QString last_error() const { return last_error_; }
  void start(int interval_ms = 1000);
  void poll_now();
  // Actions on a transfer service: POST (JSON body) or DELETE; `done` gets the HTTP
  // status (0 when unreachable) and the service's one-line error, if any.
  void post(const QString& path, const QJsonObject& body,
            std::function<void(int, QString)> done = {});
  void remove(const QString& path, std::function<void(int, QString)> done = {});

 signals:
  void updated(const QJsonObject& document);
  void availability_changed(bool up, const QString& error);

 private:
  void finished(QNetworkReply* reply);
  void set_up(bool up, const QString& error);
  void action_finished(QNetworkReply* reply, const std::function<void(int, QString)>& done);

  QNetworkRequest request(const QString& path) const;
  Kind kind_;
  QUrl base_;
  QString user_, password_;
  QNetworkAccessManager network_;
  QTimer timer_;
  bool in_flight_ = false;
  bool up_ = false;
  bool seen_ = false;
  QString last_error_;
};

// Rows for each stream and direction of a gateway, keyed by (site, stream, direction).
// Each poll replaces one site's rows: in place when they are the same rows (selections
// and scroll positions survive), else with a model reset.
template <typename RowT, int Columns>
class GatewayRowsModel : public QAbstractTableModel {
 public:
  using Row = RowT;
  using QAbstractTableModel::QAbstractTableModel;
  int rowCount(const QModelIndex& = {}) const override { return int(rows_.size()); }
  int columnCount(const QModelIndex& = {}) const override { return Columns; }
  const std::vector<Row>& rows() const { return rows_; }
  void clear() {
    beginResetModel();
    rows_.clear();
    endResetModel();
  }

  void update_site(const QJsonObject& status) {
    const QString site_name = status.value("site").toString();
    std::vector<Row> next;
    for (const auto& r : rows_)
      if (r.site != site_name) next.push_back(r);
    for (auto& row : rows_of(site_name, status)) next.push_back(std::move(row));
    auto key = [](const Row& r) { return std::tie(r.site, r.stream, r.direction); };
    std::stable_sort(next.begin(), next.end(),
                     [&](const Row& x, const Row& y) { return key(x) < key(y); });
    const bool same_rows = next.size() == rows_.size() &&
                           std::equal(next.begin(), next.end(), rows_.begin(),
                                      [&](const Row& x, const Row& y) { return key(x) == key(y); });
    if (same_rows) {
      rows_ = std::move(next);
      if (!rows_.empty()) emit dataChanged(index(0, 0), index(int(rows_.size()) - 1, Columns - 1));
      return;
    }
    beginResetModel();
    rows_ = std::move(next);
    endResetModel();
  }

 protected:
  // The first three columns of every such model: site, stream, direction.
  static QVariant key_cell(const Row& r, int column) {
    return column == 0 ? r.site : column == 1 ? r.stream : r.direction;
  }
  // A site's rows: by default one per stream object and direction that has one.
  virtual std::vector<Row> rows_of(const QString& site_name, const QJsonObject& status) const {
    std::vector<Row> rows;
    for (const auto& s : status.value("streams").toArray()) {
      for (const char* dir : {"send", "receive"}) {
        if (auto row = make_row(site_name, s.toObject(), dir)) rows.push_back(std::move(*row));
      }
    }
    return rows;
  }
  // The row for one stream object and direction of a status document, if it has one.
  virtual std::optional<Row> make_row(const QString&, const QJsonObject&, const char*) const {
    return std::nullopt;
  }
  std::vector<Row> rows_;
};

struct KeySupplyRow {
  QString site, stream, direction, kme_error, mode;
  double ready_bytes = 0, seconds_left = -1, consumption_bps = 0, fetched_bytes = 0;
  double capacity_bytes = 0;  // the key ring's size (0: not reported)
  bool kme_healthy = true;
};

// Per key supply (stream x direction at a gateway): level, time left, rates, KME health.
class KeySupplyModel : public GatewayRowsModel<KeySupplyRow, 9> {
 public:
  enum Column {
    site,
    stream,
    direction,
    ready,
    seconds_left,
    consumption,
    kme,
    last_error,
    mode,
    count
  };
  using GatewayRowsModel::GatewayRowsModel;
  QVariant data(const QModelIndex& index, int role) const override;
  QVariant headerData(int section, Qt::Orientation o, int role) const override;

 private:
  std::optional<Row> make_row(const QString& site, const QJsonObject& stream,
                              const char* direction) const override;
};

// One peer link and direction of a gateway (all its streams' key together), with the key
// forecast the gateway publishes (computed by otpgate/forecast.hpp; the console only
// formats it). `stream` holds the peer's SAE ID, so the rows sort by site, peer, direction.
struct LinkRow {
  QString site, stream, direction, kme_error, kme_note;
  int streams = 0, aes_streams = 0;
  double held_bytes = 0, ring_bytes = 0, kme_bytes = 0;
  double refill_bps = 0, consumption_bps = 0;
  double seconds_left = -1;  // -1: the key does not run out at the current rates
  double panel_seconds = 0, panel_needed = 0, panel_short = 0;
  bool panel_covered = true, kme_healthy = true, kme_trusted = false;
};

// "at the current rate the key lasts 12 min" / "refill keeps up"
QString lasts_text(const LinkRow& r);
// "a 65-minute panel needs 634 MB: covered" / "...: short by 360 MB"
QString panel_text(const LinkRow& r);

// Per peer link and direction: key held, refill, consumption, forecast, KME.
class LinkModel : public GatewayRowsModel<LinkRow, 10> {
 public:
  enum Column { site, peer, direction, held, refill, consumption, lasts, panel, kme, mode, count };
  using GatewayRowsModel::GatewayRowsModel;
  QVariant data(const QModelIndex& index, int role) const override;
  QVariant headerData(int section, Qt::Orientation o, int role) const override;

 private:
  std::vector<Row> rows_of(const QString& site_name, const QJsonObject& status) const override;
};

struct StreamRow {
  QString site, stream, direction;
  qulonglong packets = 0, bytes = 0, auth_failures = 0, replays = 0, drops = 0;
};

// Per stream and direction: packets, bytes, auth failures, replays, drops.
class StreamModel : public GatewayRowsModel<StreamRow, 8> {
 public:
  enum Column { site, stream, direction, packets, bytes, auth_failures, replays, drops, count };
  using GatewayRowsModel::GatewayRowsModel;
  QVariant data(const QModelIndex& index, int role) const override;
  QVariant headerData(int section, Qt::Orientation o, int role) const override;

 private:
  std::optional<Row> make_row(const QString& site, const QJsonObject& stream,
                              const char* direction) const override;
};

// One media of a SIP call relayed by a gateway (docs/sip.md): `stream` holds the call-id
// and `direction` the media ("0 audio"), so a call's media sort together under its site.
struct CallRow {
  QString site, stream, direction, state, endpoint, lanes, cipher;
  qulonglong packets_sent = 0, packets_received = 0;     // to the partner, to the endpoint
  qulonglong key_send_bytes = 0, key_receive_bytes = 0;  // pad used each way
  double cap_bits_per_s = 0;                             // a b=TIAS cap put on it (0: none)
  qint64 created = 0;                                    // Unix seconds
};

// Per call and media: state, endpoint, key lanes, packets each way, key used, protection,
// how long it has run. A call that ends leaves with the next poll.
class CallModel : public GatewayRowsModel<CallRow, 11> {
 public:
  enum Column {
    site,
    call,
    media,
    state,
    endpoint,
    lanes,
    sent,
    received,
    key_used,
    protection,
    duration,
    count
  };
  using GatewayRowsModel::GatewayRowsModel;
  QVariant data(const QModelIndex& index, int role) const override;
  QVariant headerData(int section, Qt::Orientation o, int role) const override;

 private:
  std::vector<Row> rows_of(const QString& site_name, const QJsonObject& status) const override;
};

// The seed's job table, one row per job of every transfer service watched.
class JobModel : public QAbstractTableModel {
  Q_OBJECT
 public:
  enum Column {
    site,
    specimen,
    job,
    folder,
    data_type,
    created,
    analysis_state,
    analysis_size,
    analysis_time,
    transfer_state,
    transfer_size,
    completed,
    method,
    progress,
    finishes,
    count
  };
  using QAbstractTableModel::QAbstractTableModel;
  int rowCount(const QModelIndex& = {}) const override { return int(rows_.size()); }
  int columnCount(const QModelIndex& = {}) const override { return count; }
  QVariant data(const QModelIndex& index, int role) const override;
  QVariant headerData(int section, Qt::Orientation o, int role) const override;
  void update_site(const QString& service, const QJsonObject& jobs_document);
  QJsonObject job_at(int row) const { return rows_.at(std::size_t(row)).second; }
  QString service_of(int row) const { return rows_.at(std::size_t(row)).first; }
  void clear() {
    beginResetModel();
    rows_.clear();
    endResetModel();
  }

 private:
  std::vector<std::pair<QString, QJsonObject>> rows_;  // service URL, job
};

// "about 14:32 under OTP (12 min)": a job's forecast as its service publishes it.
QString finishes_text(const QJsonObject& job);

// Rules over what the services report; each alert is logged once until it clears.
class AlertLog : public QStringListModel {
  Q_OBJECT
 public:
  struct Thresholds {
    // A sending link whose key (rings and the KME's store, with its refill) lasts less
    // than this at the current rate: the forecast horizon, a panel's length.
    double horizon_minutes = 65;
  };
  explicit AlertLog(QObject* parent = nullptr) : QStringListModel(parent) {}
  void set_thresholds(Thresholds t) { thresholds_ = t; }
  void check_gateway(const QString& service, const QJsonObject& status);
  void check_jobs(const QString& service, const QJsonObject& jobs);
  void service_availability(const QString& service, bool up, const QString& error);
  QStringList active() const;

 signals:
  void raised(const QString& text);

 private:
  void set(const QString& key, bool on, const QString& text);
  Thresholds thresholds_;
  std::map<QString, bool> state_;
  std::map<QString, qulonglong> counters_;  // auth failures and replays seen, per stream
};

// The console's one formatter of units, locale-aware (QLocale): bytes in decimal units
// ("3.3 MB"), rates in bit/s, kbit/s, Mbit/s, Gbit/s, durations in s, min, h.
QString human_bytes(double bytes);
struct RateUnit {
  double divisor = 1;
  QString name = "bit/s";
};
RateUnit rate_unit(double bits_per_s);  // the unit a value (or an axis top) reads best in
QString human_rate(double bits_per_s, std::optional<RateUnit> unit = std::nullopt);
QString human_duration(double seconds);
// Axis ticks for 0..top: a round step (1, 2, 2.5 or 5 x 10^n), at most `max_ticks` of them.
double tick_step(double top, int max_ticks = 5);

}  // namespace otpgate::console
